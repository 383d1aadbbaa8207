"""The README's commands run as written: each `python scripts/...` and `python -m mtj.harness` line of its code
blocks that can run on the demo model, in the README's order, with its paths moved into a temporary folder
(and training cut to a few steps)."""

import json
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, assets, hf_gptj
from mtj.tokenizer import load_tokenizer
from test_serve import free_port, request

# from_mtj_v1 needs the original's checkpoint files (tests/test_mtj_v1.py makes and converts one); the compile_check
# lines take minutes of compiling for TPUs, and tests/test_compile_check.py runs each as written and checks its answer
SKIPPED = ("from_mtj_v1.py", "compile_check.py")
OPTIONAL_LEFT_OUT = ("--num-fewshot K",)  # an option shown with a placeholder (tests/test_harness.py runs it)


def documents() -> list[Path]:
    """README.md, then the docs it links, in the order it first links them."""
    readme = (REPO / "README.md").read_text()
    return [REPO / "README.md", *(REPO / name for name in dict.fromkeys(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme)))]


def readme_commands() -> list[str]:
    """The command lines of the README and its docs (continuations joined, comments and [brackets] of options
    taken off)."""
    blocks = [b for doc in documents() for b in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)]
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split("  #")[0].strip()
        if not line.startswith(("python scripts/", "python -m mtj.harness", "openssl ")):
            continue
        for option in OPTIONAL_LEFT_OUT:
            line = line.replace(f"[{option}]", "")
        commands.append(re.sub(r"\[([^\]]*)\]", r"\1", line).strip().rstrip("&").strip())
    return commands


def test_the_readme_is_short_and_its_links_exist():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    missing = [link for link in links if not link.startswith("http") and not (REPO / link).exists()]
    assert len(links) >= 8 and not missing, missing
    for doc in documents()[1:]:  # and the docs' links to each other
        for link in re.findall(r"\]\(([\w.-]+\.md)\)", doc.read_text()):
            assert (doc.parent / link).exists(), (doc, link)


def test_every_readme_command_runs_as_written(tmp_path):
    commands = [c for c in readme_commands() if not any(s in c for s in SKIPPED)]
    assert len(commands) >= 10, commands
    before = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True).stdout
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "shakespeare.txt").write_text((assets() / "text" / "tinyshakespeare.txt").read_text()[:200_000])
    finetune = json.loads((REPO / "configs" / "demo.json").read_text())
    (tmp_path / "my_finetune.json").write_text(json.dumps({**finetune, "model_dir": str(tmp_path / "runs" / "tuned"),
                                                           "train_set": str(tmp_path / "data" / "mydata.index"),
                                                           "val_set": {}, "total_steps": 2}))
    (tmp_path / "my_tasks").mkdir()
    docs = [{"context": "To be or not to", "choices": [" be", " go"], "label": 0}] * 4
    (tmp_path / "my_tasks" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "my_tasks" / "my_task.yaml").write_text(json.dumps({
        "task": "my_task", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "my_tasks" / "docs.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))
    # the fine-tuning example's HF model: a random GPT-J of the demo config's shape
    hf_gptj(tmp_path / "gpt-j-hf", vocab_size=50257, n_positions=128, n_embd=128, n_head=4, n_layer=4, rotary_dim=16,
            bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(tmp_path / "gpt-j-hf")
    port = free_port()
    moved = {"corpus/": f"{tmp_path}/corpus/", "--output-dir data": f"--output-dir {tmp_path}/data",
             "=data/": f"={tmp_path}/data/",
             "runs/": f"{tmp_path}/runs/", "ckpt/": f"{tmp_path}/ckpt/", "hf_export": f"{tmp_path}/hf_export",
             "path/to/gpt-j-hf": f"{tmp_path}/gpt-j-hf", "my_finetune.json": f"{tmp_path}/my_finetune.json",
             "my_tasks/": f"{tmp_path}/my_tasks/", " DIR": f" {tmp_path}/my_tasks", "--port 5000": f"--port {port}",
             "--served-model-name mine": f"--served-model-name mine --port {port}",
             "--limit 500": "--limit 4", "key.pem": f"{tmp_path}/key.pem", "cert.pem": f"{tmp_path}/cert.pem",
             "keys.txt": f"{tmp_path}/keys.txt", "--host 0.0.0.0": f"--host 127.0.0.1 --port {port}"}
    (tmp_path / "keys.txt").write_text("sk-readme\n")

    def argv(command: str) -> list[str]:
        for old, new in moved.items():
            command = command.replace(old, new)
        words = shlex.split(command)
        if "scripts/train.py" in command and "--tune-model-path" not in command:
            words.append("total_steps=3")  # the demo config's 400 steps, cut
        if "mtj.harness" in command:
            words += ["--limit", "4"]  # the harness's own command line, on 4 passages
        return [sys.executable, *words[1:]] if words[0] == "python" else words

    def run(command: str) -> None:
        if "scripts/serve.py" in command:
            return serve(command)
        done = subprocess.run(argv(command), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])

    def serve(command: str) -> None:
        proc = subprocess.Popen(argv(command), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            tls = None
            if "--ssl-certfile" in command:  # the README's certificate names its host, not 127.0.0.1
                tls = ssl.create_default_context(cafile=tmp_path / "cert.pem")
                tls.check_hostname = False
            key = {"Authorization": "Bearer sk-readme"} if "--api-key-file" in command else {}
            deadline = time.time() + 180
            while True:
                assert proc.poll() is None and time.time() < deadline, (command, proc.stdout.read()[-3000:])
                try:
                    if request(port, "/health", timeout=2, tls=tls)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            # "mine": --served-model-name's, and the default (the checkpoint directory's name)
            status, body = request(port, "/v1/completions", {"model": "mine", "prompt": "ROMEO:", "max_tokens": 4},
                                   headers=key, tls=tls)
            assert status == 200 and json.loads(body)["choices"][0]["text"], body
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, proc.stdout.read()[-3000:]

    for command in commands:
        run(command)
    # nothing was written into the checkout: every output path was moved
    assert subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                          text=True).stdout == before
