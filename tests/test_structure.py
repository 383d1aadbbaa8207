"""The shape of the source: mtj's modules import each other in one direction, at the top, and only
the family records say which family a model is."""

import ast
import re

from conftest import REPO

PACKAGE = REPO / "mtj"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mtj_imports(node: ast.AST) -> list[str]:
    """The mtj modules an import statement names (`from mtj import a, b` names mtj.a and mtj.b)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mtj"]
    if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "mtj":
        modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
    assert not (isinstance(node, ast.ImportFrom) and node.level), "mtj imports itself by absolute names"
    return []


def sources() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_function_local_imports_of_mtj_modules():
    local = []
    for name, tree in sources().items():
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if mtj_imports(node):
                        local.append(f"{name}:{node.lineno}")
    assert not local, f"function-local imports of mtj modules: {local}"


def test_no_import_cycles_among_mtj_modules():
    graph = {}
    for name, tree in sources().items():
        graph[name] = {m for node in ast.walk(tree) for m in mtj_imports(node) if m != name}
    assert graph["mtj.lm"] and "mtj.model" in graph["mtj.train"]  # the graph is really read

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [module, dep]))
            if dep not in state:
                visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_only_the_family_records_compare_model_types():
    found = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "families.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"model_type\s*(==|!=)", line)]
    assert not found, found
