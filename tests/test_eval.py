"""eval_harness.py: LAMBADA scored as lm-eval scores it, checked against transformers' own model."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import mtj
from conftest import REPO, assets, hf_gptj
from mtj.evaluate import Scorer, encode, evaluate, lambada
from mtj.tokenizer import load_tokenizer

SEQ = 64  # shorter than most LAMBADA passages: contexts lose their oldest tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = hf_gptj(tmp_path_factory.mktemp("eval") / "hf", vocab_size=50257, n_positions=SEQ, n_embd=32, n_head=4,
                   rotary_dim=4, bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


def small_lambada(assets_dir, n):
    """An assets folder whose LAMBADA is the first n passages of the real one."""
    (assets_dir / "eval").mkdir()
    lines = (assets() / "eval" / "lambada_test.jsonl").read_text().splitlines()[:n]
    (assets_dir / "eval" / "lambada_test.jsonl").write_text("\n".join(lines) + "\n")


def reference(model_dir, pairs):
    """(sum log p(continuation), greedy match) per pair, from transformers' model."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ctx, cont in pairs:
        window = (ctx + cont)[-(SEQ + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0], -1).numpy()
        rows, targets = np.arange(len(window) - 1 - len(cont), len(window) - 1), np.array(cont)
        out.append((float(logp[rows, targets].sum()), bool((logp[rows].argmax(-1) == targets).all())))
    return out


def test_loglikelihoods_match_transformers(model_dir):
    lm = mtj.load(model_dir, dtype="float32")
    pairs = encode(lm.tokenizer, lambada()[:6])
    assert all(ctx + cont == lm.tokenizer.encode(c + w) for (ctx, cont), (c, w) in zip(pairs, lambada()[:6]))
    # plus continuations that are the model's own greedy choices, so that a match is scored too
    ctx = pairs[0][0][:20]
    greedy = lm.generate_tokens([ctx], 3, temperature=0)[0]
    pairs += [(ctx, greedy), (ctx, [(greedy[0] + 1) % 50257] + greedy[1:])]
    ours = list(Scorer(lm.config, lm.mesh, batch_size=4).loglikelihoods(lm.params, pairs, progress=False))  # 2 batches
    theirs = reference(model_dir, pairs)
    np.testing.assert_allclose([ll for ll, _ in ours], [ll for ll, _ in theirs], rtol=1e-5)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert ours[-2][1] and not ours[-1][1]


def test_eval_harness_script_reports_acc_and_ppl(model_dir, tmp_path):
    small_lambada(tmp_path, 12)
    env = {**os.environ, "MTJ_ASSETS": str(tmp_path)}
    cmd = [sys.executable, str(REPO / "scripts" / "eval_harness.py"), "--ckpt", str(model_dir), "--json"]
    out = subprocess.run(cmd + ["--tasks", "lambada", "--limit", "10"], env=env, capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    lm = mtj.load(model_dir)
    theirs = reference(model_dir, encode(lm.tokenizer, lambada(tmp_path / "eval" / "lambada_test.jsonl")[:10]))
    assert result["task"] == "lambada" and result["examples"] == 10
    assert result["acc"] == pytest.approx(np.mean([g for _, g in theirs]))
    # fp32 sums of ~60 log-probabilities over a 50k vocabulary: equal to ~1e-5 relative
    assert math.log(result["ppl"]) == pytest.approx(-np.mean([ll for ll, _ in theirs]), rel=1e-5)

    bad = subprocess.run(cmd + ["--tasks", "lambada,hellaswag"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "hellaswag" in bad.stderr and "known tasks: lambada" in bad.stderr


def test_training_scores_eval_harness_tasks_at_each_validation(tmp_path, monkeypatch):
    from mtj.train import train
    from test_train import config, metrics

    small_lambada(tmp_path, 5)
    cfg = config(tmp_path, total_steps=4, val_every=2, eval_harness_tasks=["lambada", "hellaswag"],
                 tokenizer=str(assets() / "gpt2"))
    monkeypatch.setenv("MTJ_ASSETS", str(tmp_path))  # after config(): corpus and tokenizer are real assets
    train(cfg, progress=False)
    rows = metrics(tmp_path / "run")
    assert [s for s, r in rows.items() if "eval/lambada/ppl" in r] == [2, 4]
    assert not any("eval/hellaswag/acc" in r for r in rows.values())  # unknown tasks are skipped
    final = evaluate(mtj.load(tmp_path / "run"), "lambada", progress=False)
    assert rows[4]["eval/lambada/ppl"] == pytest.approx(final["ppl"], rel=1e-5)
    assert rows[4]["eval/lambada/acc"] == final["acc"] and rows[2]["eval/lambada/ppl"] != final["ppl"]
