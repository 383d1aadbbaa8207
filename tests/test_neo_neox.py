"""GPT-Neo and GPT-NeoX against transformers: conversion both ways, sharding, generation, counts, tokenizers."""

import subprocess
import sys

import numpy as np
import pytest

import mtj
from conftest import REPO, SHARP, assert_logits_close, assets, hf_logits, random_vectors
from mtj.config import load_config
from mtj.model import count_params
from mtj.tokenizer import load_tokenizer
from test_generate import PROMPTS, hf_greedy

NEO = {  # local windows shorter than the sequence, odd vocabulary, several head counts
    "neo_alternating": dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1001, window_size=5,
                            attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
    "neo_local_first": dict(hidden_size=48, num_layers=3, num_heads=2, vocab_size=512, window_size=3,
                            attention_types=[[["local", "global", "local"], 1]], max_position_embeddings=64,
                            intermediate_size=80),
    "neo_8_heads": dict(hidden_size=64, num_layers=2, num_heads=8, vocab_size=777, window_size=8,
                        attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
}
NEOX = {  # both residual forms, partial and full rotary
    "neox_parallel": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          vocab_size=1000, use_parallel_residual=True, max_position_embeddings=64),
    "neox_sequential": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, intermediate_size=96,
                            vocab_size=1003, use_parallel_residual=False, max_position_embeddings=64,
                            rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
    "neox_full_rotary": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             vocab_size=640, use_parallel_residual=True, max_position_embeddings=64,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                             hidden_act="gelu_new"),
}


def hf_model(path, family: str, seed: int, **kw):
    import torch
    import transformers

    config = (transformers.GPTNeoConfig if family == "neo" else transformers.GPTNeoXConfig)(
        bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(seed)
    cls = transformers.GPTNeoForCausalLM if family == "neo" else transformers.GPTNeoXForCausalLM
    model = cls(config).eval()
    random_vectors(model)
    model.save_pretrained(path)
    return model


CASES = [("neo", n) for n in NEO] + [("neox", n) for n in NEOX]


@pytest.mark.parametrize("family,name", CASES)
def test_conversion_sharding_and_generation(tmp_path, rng, family, name):
    kw = (NEO if family == "neo" else NEOX)[name]
    model = hf_model(tmp_path / "hf", family, len(name), **SHARP, **kw)
    tokens = rng.randint(0, kw["vocab_size"], (2, 24))
    reference = hf_logits(tmp_path / "hf", tokens)

    subprocess.run([sys.executable, str(REPO / "scripts" / "from_hf.py"), "--hf", str(tmp_path / "hf"),
                    "--out", str(tmp_path / "ckpt"), "dtype=float32"], check=True, cwd=REPO)
    lm = mtj.load(tmp_path / "ckpt")
    ours = lm.logits(tokens)
    assert_logits_close(ours, reference)
    for mp in (4, 8):
        if lm.config.n_heads % mp == 0:
            assert_logits_close(mtj.load(tmp_path / "ckpt", mp=mp).logits(tokens), ours)

    subprocess.run([sys.executable, str(REPO / "scripts" / "to_hf.py"), "--ckpt", str(tmp_path / "ckpt"),
                    "--out", str(tmp_path / "export")], check=True, cwd=REPO)
    assert_logits_close(hf_logits(tmp_path / "export", tokens), ours)

    prompts = [[t % kw["vocab_size"] for t in p] for p in PROMPTS]
    assert lm.generate_tokens(prompts, max_new_tokens=16, temperature=0) == hf_greedy(model, prompts, 16)


def test_neox_uses_one_mesh_rule_table(tmp_path):
    hf_model(tmp_path / "hf", "neox", 0, **NEOX["neox_parallel"])
    lm = mtj.load(tmp_path / "hf", mp=4, dtype="float32")
    assert lm.params["layers"]["attn"]["q_bias"].sharding.spec[1] == "mp"
    assert lm.params["lm_head"]["kernel"].sharding.spec[1] == "mp"


@pytest.mark.parametrize("name,expected", [("gpt_neo_1.3B.json", 1_315_575_808), ("gpt_neox_20B.json", 20_554_567_680)])
def test_parameter_counts(name, expected):
    assert count_params(load_config(REPO / "configs" / name)) == expected


@pytest.mark.parametrize("tokenizer,stem", [("gpt2", "gpt2/llamacpp-vocab-test"),
                                            ("gpt-neox-20b", "neox/llamacpp-vocab-test-mpt")])
def test_tokenizer_vectors(tokenizer, stem):
    # each input string (possibly several lines) is followed by a separator line; .out has a line of ids per input
    inputs, lines = [], []
    for line in (assets() / f"{stem}.inp").read_text(encoding="utf-8").split("\n"):
        if line == "__ggml_vocab_test__":
            inputs.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    outputs = (assets() / f"{stem}.out").read_text().split("\n")[: len(inputs)]
    tok = load_tokenizer(tokenizer)
    assert len(inputs) == len(outputs) >= 40
    for text, ids in zip(inputs, outputs):
        assert tok.encode(text) == [int(t) for t in ids.split()], repr(text)


@pytest.mark.parametrize("family", ["gpt_neo", "gpt_neox"])
def test_small_model_trains_and_exports(tmp_path, family):
    from mtj.config import from_dict
    from mtj.train import train

    extra = dict(tie_embeddings=True, attention_layers=["global", "local"], window_size=16, n_vocab=50257,
                 tokenizer="gpt2") if family == "gpt_neo" else \
        dict(n_vocab=50277, pe_rotary_dims=4, parallel_residual=False, tokenizer="gpt-neox-20b", activation="gelu")
    cfg = from_dict(dict(model_type=family, layers=2, d_model=64, n_heads=4, seq=32, per_replica_batch=1,
                         cores_per_replica=2, lr=3e-3, end_lr=3e-4, warmup_steps=5, anneal_steps=45, total_steps=50,
                         dtype="float32", train_set=str(assets() / "text" / "tinyshakespeare.txt"),
                         model_dir=str(tmp_path / "run"), log_every=1, **extra))
    train(cfg, progress=False)
    rows = [__import__("json").loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.8 * rows[0]["loss"]

    subprocess.run([sys.executable, str(REPO / "scripts" / "to_hf.py"), "--ckpt", str(tmp_path / "run"),
                    "--out", str(tmp_path / "hf")], check=True, cwd=REPO)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("ROMEO: What, ho!")["input_ids"]
    assert ids == load_tokenizer(cfg.tokenizer).encode("ROMEO: What, ho!")
    tokens = np.array([ids])
    assert_logits_close(hf_logits(tmp_path / "hf", tokens), mtj.load(tmp_path / "run").logits(tokens))
