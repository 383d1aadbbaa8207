"""GPT-J against transformers: HF -> mtj and mtj -> HF give the same logits (fp32)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import mtj
from conftest import REPO, SHARP, assert_logits_close, hf_gptj, hf_logits
from mtj.workflows import import_hf

CONFIGS = {
    # different head counts, rotary dims equal to and smaller than d_head, odd vocab
    "h4_rot8": dict(n_embd=64, n_head=4, rotary_dim=8, vocab_size=1000),
    "h8_full_rotary": dict(n_embd=64, n_head=8, rotary_dim=8, vocab_size=512, n_layer=3),
    "h2_odd_vocab": dict(n_embd=48, n_head=2, rotary_dim=16, vocab_size=1001, n_inner=80),
}


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)], check=True, cwd=REPO)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_round_trip(tmp_path, rng, name):
    kw = CONFIGS[name]
    hf_dir = hf_gptj(tmp_path / "hf", seed=len(name), **SHARP, **kw)
    tokens = rng.randint(0, kw["vocab_size"], (3, 20))
    reference = hf_logits(hf_dir, tokens)

    # HF directory loaded directly, and through from_hf.py into our checkpoint.
    direct = mtj.load(hf_dir, dtype="float32").logits(tokens)
    assert_logits_close(direct, reference)
    run("from_hf.py", "--hf", hf_dir, "--out", tmp_path / "ckpt", "dtype=float32")
    ours = mtj.load(tmp_path / "ckpt").logits(tokens)
    assert ours.shape == reference.shape  # the padded vocabulary never shows
    assert_logits_close(ours, reference)

    # mtj -> HF: transformers' logits of the export equal ours.
    run("to_hf.py", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "export")
    assert_logits_close(hf_logits(tmp_path / "export", tokens), ours)


def test_odd_vocab_sharded_mp4(tmp_path, rng):
    hf_dir = hf_gptj(tmp_path / "hf", n_embd=64, n_head=4, rotary_dim=8, vocab_size=1001, **SHARP)
    tokens = rng.randint(0, 1001, (2, 12))
    lm = mtj.load(hf_dir, mp=4, dtype="float32")
    assert lm.config.padded_vocab % 4 == 0 and lm.config.padded_vocab > 1001
    assert lm.params["wte"].sharding.spec[0] == "mp"
    assert_logits_close(lm.logits(tokens), hf_logits(hf_dir, tokens))


def test_export_dtypes_and_files(tmp_path, rng):
    import json

    import torch
    import transformers

    from mtj.tokenizer import load_tokenizer

    hf_dir = hf_gptj(tmp_path / "hf", vocab_size=50257, n_embd=32, n_head=4, rotary_dim=4, bos_token_id=50256,
                     eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(hf_dir)  # so the checkpoint carries a tokenizer
    run("from_hf.py", "--hf", hf_dir, "--out", tmp_path / "ckpt")
    run("to_hf.py", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "bf16", "--dtype", "bf16")
    out = tmp_path / "bf16"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "gptj"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert not list(tmp_path.glob(".bf16.tmp-*"))  # the temporary directory was renamed away
    # shared as anything the user makes: the umask's permissions, not a temporary directory's private ones
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o666 & ~mask for p in out.iterdir()}
    # the context is config.json's: a max_length here makes transformers warn at every generate(max_new_tokens=...)
    assert "max_length" not in json.loads((out / "generation_config.json").read_text())

    # The export never overwrites existing data.
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "to_hf.py"), "--ckpt", str(tmp_path / "ckpt"),
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode != 0 and "already exists" in result.stderr


def test_directory_without_tokenizer_loads(tmp_path, rng):
    hf_dir = hf_gptj(tmp_path / "hf")
    lm = mtj.load(hf_dir, dtype="float32")
    assert lm.tokenizer is None
    assert lm.logits(rng.randint(0, 1000, (1, 5))).shape == (1, 5, 1000)
    with pytest.raises(ValueError, match="no tokenizer"):
        lm.require_tokenizer()


def test_pickle_needs_explicit_flag(tmp_path):
    import torch
    import transformers

    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4,
                                                                 rotary_dim=4, n_positions=32))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="--allow-pickle"):
        import_hf(tmp_path, tmp_path / "ckpt")
    import_hf(tmp_path, tmp_path / "ckpt", allow_pickle=True, dtype="float32")
    tokens = np.arange(10)[None]
    with torch.no_grad():
        ref = model.eval()(torch.tensor(tokens)).logits.numpy()
    assert_logits_close(mtj.load(tmp_path / "ckpt").logits(tokens), ref)
