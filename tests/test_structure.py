"""The shape of the source: mtj's modules import each other in one direction, at the top, and only
the family records say which family a model is."""

import ast
import importlib.util
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


def test_every_module_level_import_is_a_core_dependency():
    """`import mtj` (and any module of it) works on the core install, what a TPU VM has: each third-party package
    imported at a module's top comes from a distribution in pyproject's `dependencies` (the extras' packages are
    imported inside the functions that need them)."""
    import importlib.metadata
    import sys
    import tomllib

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    core = {norm(Requirement(r).name) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    missing = []
    for name, tree in sources().items():
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"mtj", "__future__"}:
                if not core & {norm(d) for d in providers.get(top, [])}:
                    missing.append(f"{name} imports {top} ({', '.join(providers.get(top, ['no distribution']))})")
    assert not missing, sorted(set(missing))


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


def test_the_end_of_a_row_is_decided_in_one_place():
    """On the host, mtj.decode.stops.RowText decides when a generated row ends (EOS, a stop string, its token
    budget) and what its text is: nothing else cuts text at stop strings or compares tokens with EOS, except
    the compiled decode loops, which stop computing a row that ended on the device."""
    compiled_loops = {"mtj.decode.generator", "mtj.decode.slots"}
    found = []
    for name, tree in sources().items():
        if name == "mtj.decode.stops":
            continue
        for node in ast.walk(tree):
            called = isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
            if called in ("truncate_at_stop", "split", "find", "index") and "stop" in ast.unparse(node) or \
                    isinstance(node, ast.Compare) and "eos" in ast.unparse(node) and name not in compiled_loops and \
                    not all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):  # (not "eos_id is None")
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_only_the_layout_record_reads_the_weights_keys():
    """model.Layout reads how a weights dict is arranged (stacked or per layer, q/k/v joined, a tied head); other
    code asks it, not the dict's keys."""
    found = []
    for name, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and \
                    isinstance(node.left, ast.Constant) and node.left.value in (0, "qkv", "lm_head"):
                found.append(f"{name}: {ast.unparse(node)}")
    assert sorted(found) == ["mtj.model: 'lm_head' not in params", "mtj.model: 'qkv' in first['attn']",
                             "mtj.model: 0 not in params['layers']"], found


def test_only_the_platform_table_asks_which_backend_runs():
    """mtj/platforms.py holds what each backend does differently; other modules read its fields and never ask
    for JAX's backend or compare a platform's name."""
    names = {"cpu", "gpu", "tpu", "cuda", "rocm"}
    found = []
    for name, tree in sources().items():
        if name == "mtj.platforms":
            continue
        for node in ast.walk(tree):
            asks = isinstance(node, ast.Attribute) and node.attr in ("default_backend", "jax_platforms")
            compares = isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators])
            if asks or compares:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


# Longer than the rule allows, each with its reason; no other class or function may grow past it.
LONG: dict[str, str] = {}


def test_no_class_over_150_lines_and_no_function_over_60():
    found = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name, lines = f"{prefix}.{child.name}", child.end_lineno - child.lineno + 1
                if lines > (150 if isinstance(child, ast.ClassDef) else 60):
                    found[name] = lines
                visit(child, name)

    for module, tree in sources().items():
        visit(tree, module)
    assert set(found) <= set(LONG), {k: v for k, v in found.items() if k not in LONG}
    assert set(LONG) <= set(found), f"no longer long, take them off LONG: {set(LONG) - set(found)}"


def test_the_planted_bugs_apply_to_the_current_source():
    """tests/planted/run.py plants each bug by replacing a text found exactly once; a stale one plants nothing."""
    spec = importlib.util.spec_from_file_location("bugs", REPO / "tests" / "planted" / "bugs.py")
    bugs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bugs)
    stale = [(bug.name, file) for bug in bugs.BUGS for file, text, _ in bug.edits
             if (REPO / file).read_text().count(text) != 1]
    assert not stale, stale
