"""The installed commands: a non-editable install of mtj gives working `mtj-*` programs."""

import concurrent.futures
import os
import re
import site
import subprocess
import sys
import tomllib

from conftest import REPO, assets

def mtj_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


COMMANDS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def test_a_wheel_installed_in_a_fresh_venv_gives_working_commands(tmp_path):
    # The wheel is built and installed offline: mtj without its dependencies, which the fresh venv
    # reads from this one's site-packages (a path, so this venv's editable mtj is not seen).
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (next((venv / "lib").glob("python*")) / "site-packages" / "deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              *map(str, (tmp_path / "dist").glob("mtj-*.whl"))], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]

    env = {**os.environ, "MTJ_ASSETS": str(assets())}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import mtj, mtj.harness; print(mtj.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.returncode == 0 and where.stdout.startswith(str(venv)), (where.stdout, where.stderr[-2000:])

    def help_of(command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / command), "--help"], cwd=tmp_path, env=env, capture_output=True,
                              text=True)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        helps = dict(zip(COMMANDS, pool.map(help_of, COMMANDS)))
    for command, result in helps.items():
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert result.stdout.startswith(f"usage: {command} "), (command, result.stdout[:200])
        # every option says what it is: text after its signature, on its line or the next ones
        blocks = re.findall(r"^  (-.*(?:\n {6,}.*)*)", result.stdout.split("options:")[1], re.M)
        assert len(blocks) > 1, (command, result.stdout)
        for block in blocks:
            assert re.search(r"\S {2,}\S", block.splitlines()[0]) or "\n" in block, (command, block)
    assert "(default: 5000)" in helps["mtj-serve"].stdout
    version = subprocess.run([str(venv / "bin" / "mtj-train"), "--version"], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"mtj-train (mtj) {mtj_version()}", version

    # A real command end to end, and a user's mistake as one line.
    text = tmp_path / "text.txt"
    text.write_text("A few words to tokenize. " * 200)
    made = subprocess.run([str(venv / "bin" / "mtj-create-tfrecords"), str(text), "tiny", "--output-dir",
                           str(tmp_path / "data"), "--tokenizer", "gpt2", "--seq", "32"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (tmp_path / "data" / "tiny.index").is_file()
    missing = subprocess.run([str(venv / "bin" / "mtj-train"), "--config", str(tmp_path / "nope.json")], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope.json" in missing.stderr


def test_scripts_in_a_checkout_are_the_commands():
    for script in (REPO / "scripts").glob("*.py"):
        text = script.read_text()
        assert "sys.path" not in text, script
        assert re.search(r"^from mtj\.commands\.\w+ import cli$", text, re.M), script


def test_no_tpu_detection_noise_on_a_machine_without_tpus():
    """libtpu is installed here (compile_check's AOT tests); on a machine without TPU chips nothing may print
    its detection errors (`E0000 ... unexpected worker hostname`, `could not determine TPU ...`)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # JAX picks its platforms itself
    uses = subprocess.run([sys.executable, "-c", "import mtj, jax; jax.devices(); print(jax.default_backend())"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    helps = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert uses.returncode == 0 and uses.stdout.strip() == "cpu", uses.stderr[-2000:]
    assert helps.returncode == 0
    for stderr in (uses.stderr, helps.stderr):
        assert "TPU" not in stderr and "E0000" not in stderr, stderr[-2000:]


def test_a_known_tokenizer_without_mtj_assets_says_where_to_get_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MTJ_ASSETS"}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty hub cache: offline, the hub's copy cannot be had
    (tmp_path / "a.txt").write_text("Some text. " * 50)
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "create_tfrecords.py"), str(tmp_path / "a.txt"), "a",
                           "--output-dir", str(tmp_path / "out"), "--tokenizer", "gpt2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    last = made.stderr.strip().splitlines()[-1]
    assert made.returncode == 1 and last.startswith("error: tokenizer 'gpt2' is a known name"), made.stderr[-2000:]
    assert "MTJ_ASSETS" in last and "docs/assets.md" in last and "openai-community/gpt2" in last
    assert (REPO / "docs" / "assets.md").is_file()
