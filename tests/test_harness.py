"""lm-evaluation-harness with `--model mtj` against the harness's own `--model hf` on our HF export:
a loglikelihood task (the shipped local lambada_openai), a multiple-choice task, a rolling-perplexity
task and a generate_until task, written here as local YAML + jsonl."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import numpy as np
import pytest
from lm_eval.tasks import TaskManager

from conftest import REPO, assets, hf_gptj
from mtj.workflows import export_hf, import_hf
from mtj.harness import task_dir
from mtj.tokenizer import load_tokenizer
from test_serve import free_port

SEQ = 64  # shorter than many documents: contexts are cut and rolling windows used

TASKS = {
    "mtj_mc": {  # multiple choice: which ending follows
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
    "mtj_rolling": {  # perplexity of whole documents, longer than the context
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    },
    "mtj_generate": {  # greedy continuation up to a stop string
        "output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{ending}}",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    },
}


def write_tasks(folder: Path) -> Path:
    """The test tasks over passages of the bundled corpus."""
    text = (assets() / "text" / "tinyshakespeare.txt").read_text()
    passages = [p.strip() for p in text.split("\n\n") if len(p.strip().split()) > 12][:40]
    docs = []
    for i, p in enumerate(passages[:12]):
        words = p.split()
        endings = [" ".join(q.split()[:4]) for q in passages[i + 12: i + 15]] + [" ".join(words[-4:])]
        docs.append({"context": " ".join(words[:-4]), "choices": endings, "label": 3, "ending": " " + " ".join(words[-4:]),
                     "text": p})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return folder


@pytest.fixture(scope="module")
def gptj(tmp_path_factory) -> tuple[Path, Path]:
    """(an mtj checkpoint of a random GPT-J with the GPT-2 tokenizer, its export by to_hf), made once."""
    root = tmp_path_factory.mktemp("gptj")
    hf_gptj(root / "hf", vocab_size=50257, n_positions=SEQ, n_embd=32, n_head=4, rotary_dim=4, bos_token_id=50256,
            eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(root / "hf")
    import_hf(root / "hf", root / "ckpt")
    export_hf(root / "ckpt", root / "export")
    return root / "ckpt", root / "export"


def evaluate(model, model_args: str, tasks: list[str], include: list[str], limit: int = 12) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, device="cpu",
                                   batch_size=4, task_manager=TaskManager(include_path=include), log_samples=True,
                                   bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0)


def test_mtj_gives_the_harness_numbers_of_its_hf_model(gptj, tmp_path):
    # (one family: the wrapper is the same for all; each family's logits are checked against transformers elsewhere)
    ckpt, export = gptj
    include = [task_dir(), str(write_tasks(tmp_path / "tasks"))]
    tasks = ["lambada_openai", *TASKS]
    ours = evaluate("mtj", f"ckpt={ckpt},dtype=float32", tasks, include)
    theirs = evaluate("hf", f"pretrained={export},dtype=float32", tasks, include)
    for task in tasks:
        a, b = ours["results"][task], theirs["results"][task]
        metrics = [k for k in b if k.endswith(",none") and "stderr" not in k]
        assert metrics, b
        for key in metrics:
            if key.startswith(("acc", "exact_match")):
                assert a[key] == b[key], (task, key, a[key], b[key])
            else:
                assert math.isclose(a[key], b[key], rel_tol=1e-4), (task, key, a[key], b[key])
        assert a["samples" if "samples" in a else metrics[0]] is not None
    # Per request: log-likelihoods within 1e-4 relative, greedy flags and generated text identical.
    for task in tasks:
        for x, y in zip(ours["samples"][task], theirs["samples"][task]):
            for r, s in zip(x["resps"], y["resps"]):
                if task == "mtj_generate":
                    assert r == s
                else:
                    r, s = (np.atleast_1d(np.asarray(v[0], dtype=object)) for v in (r, s))
                    assert math.isclose(float(r[0]), float(s[0]), rel_tol=1e-4, abs_tol=1e-4), (task, r, s)
                    if len(r) > 1:
                        assert bool(r[1]) == bool(s[1])
    assert any(x["resps"][0][0] for x in ours["samples"]["mtj_generate"])  # some text was generated


def eval_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "eval_harness.py"), *args], cwd=REPO,
                          capture_output=True, text=True)


def test_eval_harness_script_prints_the_harness_table_and_json(gptj, tmp_path):
    ckpt, _ = gptj
    tasks = write_tasks(tmp_path / "tasks")
    common = ["--ckpt", str(ckpt), "--tasks", "lambada,mtj_mc", "--include-path", str(tasks), "--limit", "6",
              "--dtype", "float32"]
    table = eval_script(*common)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "overrides existing task" not in table.stderr  # mtj's own lambada_openai replaces the harness's quietly
    assert "|lambada_openai|" in table.stdout.replace(" ", "") and "|mtj_mc|" in table.stdout.replace(" ", "")
    as_json = eval_script(*common, "--json")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    results = json.loads(as_json.stdout.strip().splitlines()[-1])["results"]
    for task, metric in [("lambada_openai", "acc,none"), ("lambada_openai", "perplexity,none"), ("mtj_mc", "acc,none")]:
        assert f"{results[task][metric]:.4f}" in table.stdout, (task, metric)  # the table's numbers
    unknown = eval_script("--ckpt", str(ckpt), "--tasks", "lambada,no_such_task")
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines()[-1] == "error: Tasks not found: no_such_task"
    # a task whose data is on the hub, offline: a failed download, not a storage problem
    offline = eval_script("--ckpt", str(ckpt), "--tasks", "hellaswag", "--limit", "2")
    last = offline.stderr.strip().splitlines()[-1]
    assert offline.returncode == 1 and last.startswith("error: a download failed:") and "hellaswag" in last, last
    assert "STORAGE_EMULATOR_HOST" not in offline.stderr


def test_num_fewshot_reaches_the_harness(gptj, tmp_path):
    ckpt, _ = gptj
    tasks = write_tasks(tmp_path / "tasks")
    done = eval_script("--ckpt", str(ckpt), "--tasks", "mtj_mc", "--include-path", str(tasks), "--limit", "4",
                       "--num-fewshot", "2", "--dtype", "float32", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    want = lm_eval.simple_evaluate(model="mtj", model_args=f"ckpt={ckpt},dtype=float32", tasks=["mtj_mc"], limit=4,
                                   num_fewshot=2, task_manager=TaskManager(include_path=[str(tasks)]), device="cpu",
                                   bootstrap_iters=0)  # the harness's default seeds, as the script
    assert out["n-shot"] == {"mtj_mc": 2} == want["n-shot"]
    for key in ("acc,none", "acc_norm,none"):
        assert out["results"]["mtj_mc"][key] == want["results"]["mtj_mc"][key]


def test_training_logs_harness_metrics_equal_to_the_script_on_that_step(tmp_path):
    from mtj.train import train
    from test_train import config, metrics

    tasks = write_tasks(tmp_path / "tasks")
    cfg = config(tmp_path, total_steps=4, val_every=2, ckpt_every=2, keep_last=0,
                 eval_harness_tasks=[str(tasks / "mtj_mc.yaml"), "hellaswag"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(cfg, progress=False)
    assert "eval_harness_tasks: leaving out 'hellaswag'" in printed.getvalue()  # no data offline; training went on
    rows = metrics(tmp_path / "run")
    assert [s for s, r in rows.items() if "eval/mtj_mc/acc" in r] == [2, 4]
    # the last step against the script (one harness start; step 2's numbers are logged by the same code)
    run = eval_script("--ckpt", str(tmp_path / "run" / "step_4"), "--tasks", str(tasks / "mtj_mc.yaml"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])["results"]["mtj_mc"]
    assert rows[4]["eval/mtj_mc/acc"] == results["acc,none"]
    assert rows[4]["eval/mtj_mc/acc_norm"] == results["acc_norm,none"]


def test_two_processes_score_like_one(gptj, tmp_path):
    ckpt, _ = gptj
    tasks = write_tasks(tmp_path / "tasks")
    args = ["--ckpt", str(ckpt), "--tasks", "lambada,mtj_mc,mtj_rolling", "--include-path", str(tasks), "--limit", "6",
            "--dtype", "float32", "--mp", "4", "--json"]
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # dp=2 x mp=4 over two processes
    procs = [subprocess.Popen([sys.executable, str(REPO / "scripts" / "eval_harness.py"), *args, "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # process 0 reports
    two = json.loads(outs[0][0].strip().splitlines()[-1])["results"]
    one_run = eval_script(*args)  # one process, mp=4 on 4 of its 8 devices
    assert one_run.returncode == 0, one_run.stderr[-3000:]
    one = json.loads(one_run.stdout.strip().splitlines()[-1])["results"]
    for task in ("lambada_openai", "mtj_mc", "mtj_rolling"):
        for key, value in one[task].items():
            if "," in key and "stderr" not in key:
                assert math.isclose(two[task][key], value, rel_tol=1e-5), (task, key, two[task][key], value)
