"""The scorer behind lm-eval's loglikelihood requests (mtj.harness), checked against transformers' own model."""

import json

import numpy as np
import pytest

import mtj
from conftest import assets, hf_gptj
from mtj.evaluate import Scorer
from mtj.tokenizer import load_tokenizer

SEQ = 64  # shorter than most LAMBADA passages: contexts lose their oldest tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = hf_gptj(tmp_path_factory.mktemp("eval") / "hf", vocab_size=50257, n_positions=SEQ, n_embd=32, n_head=4,
                   rotary_dim=4, bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


def lambada_pairs(tok, n):
    """(context ids, last word's ids) of the first n LAMBADA passages, split as lm-eval splits them."""
    pairs = []
    for line in (assets() / "eval" / "lambada_test.jsonl").read_text().splitlines()[:n]:
        context, word = json.loads(line)["text"].strip().rsplit(" ", 1)
        ctx = tok.encode(context)
        pairs.append((ctx, tok.encode(context + " " + word)[len(ctx):]))
    return pairs


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
    pairs = lambada_pairs(lm.tokenizer, 6)
    # plus continuations that are the model's own greedy choices, so that a match is scored too
    ctx = pairs[0][0][:20]
    greedy = lm.generate_tokens([ctx], 3, temperature=0)[0]
    pairs += [(ctx, greedy), (ctx, [(greedy[0] + 1) % 50257] + greedy[1:])]
    ours = list(Scorer(lm.config, lm.mesh, batch_size=4).loglikelihoods(lm.params, pairs, progress=False))  # 2 batches
    theirs = reference(model_dir, pairs)
    np.testing.assert_allclose([ll for ll, _ in ours], [ll for ll, _ in theirs], rtol=1e-5)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert ours[-2][1] and not ours[-1][1]
