"""Importing original Mesh Transformer JAX (v1) checkpoints: written here from a random transformers
GPT-J the way the original's `write_ckpt` lays them out, then checked against transformers' logits."""

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import mtj
from conftest import SHARP, assert_logits_close, hf_gptj, hf_logits
from mtj.workflows import import_v1
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
LAYERS, SHARDS = 11, 2  # 11 layers: haiku's sorted names put layer_10 before layer_2


def split_list(items, n):
    """The original's split of the flattened leaves over 16 files."""
    k, m = divmod(len(items), n)
    return [items[i * k + min(i, m):(i + 1) * k + min(i + 1, m)] for i in range(n)]


def v1_leaves(hf_dir: Path, exact_sums: bool) -> list[tuple[str, list[np.ndarray]]]:
    """(haiku leaf name, per-shard slices) in tree_flatten order, from an HF GPT-J's weights.

    Bias terms that the original psums are split into random per-shard parts
    (all on shard 0 when `exact_sums`, so bf16 slices stay exact)."""
    with safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as f:
        hf = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    rng = np.random.RandomState(1)

    def summed(a):
        if exact_sums:
            return [a] + [np.zeros_like(a)] * (SHARDS - 1)
        parts = [rng.randn(*a.shape).astype(np.float32) for _ in range(SHARDS - 1)]
        return [a - sum(parts)] + parts

    def by(axis):
        return lambda a: np.split(a, SHARDS, axis=axis)

    out, same = by(-1), (lambda a: [a] * SHARDS)
    params = {}
    for i in range(LAYERS):
        h, m = f"transformer.h.{i}.", f"causal_transformer_shard/~/layer_{i}/~/"
        params[m + "linear/w"] = out(hf[h + "attn.q_proj.weight"].T)
        params[m + "linear_1/w"] = out(hf[h + "attn.v_proj.weight"].T)
        params[m + "linear_2/w"] = out(hf[h + "attn.k_proj.weight"].T)
        params[m + "linear_3/w"] = by(0)(hf[h + "attn.out_proj.weight"].T)
        params[m + "linear_4/w"] = out(hf[h + "mlp.fc_in.weight"].T)
        params[m + "linear_4/b"] = out(hf[h + "mlp.fc_in.bias"])
        params[m + "linear_5/w"] = by(0)(hf[h + "mlp.fc_out.weight"].T)
        params[m + "linear_5/b"] = summed(hf[h + "mlp.fc_out.bias"])
        params[m + "replicated_layer_norm/offset"] = same(hf[h + "ln_1.bias"])
        params[m + "replicated_layer_norm/scale"] = same(hf[h + "ln_1.weight"])
    emb_bias = summed(np.zeros(hf["transformer.wte.weight"].shape[1], np.float32) if exact_sums
                      else rng.randn(hf["transformer.wte.weight"].shape[1]).astype(np.float32))
    params["causal_transformer_shard/~/embedding_shard/~/linear/b"] = emb_bias
    params["causal_transformer_shard/~/embedding_shard/~/linear/w"] = by(0)(hf["transformer.wte.weight"] - sum(emb_bias))
    p = "causal_transformer_shard/~/projection_shard/~/"
    params[p + "linear/w"] = out(hf["lm_head.weight"].T)
    params[p + "linear/b"] = out(hf["lm_head.bias"])
    params[p + "replicated_layer_norm/offset"] = same(hf["transformer.ln_f.bias"])
    params[p + "replicated_layer_norm/scale"] = same(hf["transformer.ln_f.weight"])
    # tree_flatten sorts dict keys: {"opt_state", "params", "step"}, and haiku's module names
    opt_state = [(f"opt_state/{j}", [rng.randn(3, j + 1).astype(np.float32)] * SHARDS) for j in range(5)]
    return opt_state + sorted(params.items()) + [("step", [np.array(383500)] * SHARDS)]


def write_v1(step_dir: Path, leaves, bf16: bool = False) -> None:
    for s in range(SHARDS):
        shard = [parts[s] for _, parts in leaves]
        if bf16:  # as the original saved bfloat16: numpy's raw 2-byte void
            shard = [a.astype(ml_dtypes.bfloat16).view("V2") if a.dtype == np.float32 else a for a in shard]
        (step_dir / f"shard_{s}").mkdir(parents=True)
        for f, chunk in enumerate(split_list(shard, 16)):
            np.savez(step_dir / f"shard_{s}" / f"{f}.npz", *chunk)


def original_config(path: Path, **changes) -> Path:
    cfg = {"layers": LAYERS, "d_model": 32, "n_heads": 4, "n_vocab": 1000, "norm": "layernorm", "pe": "rotary",
           "pe_rotary_dims": 4, "seq": 64, "cores_per_replica": SHARDS, "per_replica_batch": 1,
           "gradient_accumulation_steps": 16, "warmup_steps": 3000, "anneal_steps": 300000, "lr": 1.2e-4,
           "end_lr": 1.2e-5, "weight_decay": 0.1, "total_steps": 350000, "tpu_size": 8, "bucket": "",
           "model_dir": "", "train_set": "pile.train.index", "val_set": {}, "eval_harness_tasks": [],
           "val_batches": 0, "val_every": 500, "ckpt_every": 500, "keep_every": 10000, "name": "tiny",
           "wandb_project": "mesh-transformer-jax", "comment": ""}
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_gptj(tmp_path_factory.mktemp("v1") / "hf", vocab_size=1000, n_embd=32, n_head=4, rotary_dim=4,
                   n_layer=LAYERS, **SHARP)


def test_v1_checkpoint_gives_transformers_logits(hf_dir, tmp_path):
    step_dir = tmp_path / "step_383500"
    write_v1(step_dir, v1_leaves(hf_dir, exact_sums=False))
    config = original_config(tmp_path / "tiny.json")
    out = tmp_path / "imported"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/from_mtj_v1.py"), "--ckpt", str(step_dir),
                             "--config", str(config), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lm = mtj.load(out, dtype="float32")
    tokens = np.random.RandomState(0).randint(0, 1000, (2, 12))
    assert_logits_close(lm.logits(tokens), hf_logits(hf_dir, tokens))
    assert lm.tokenizer is not None  # the original's GPT-2 tokenizer
    assert mtj.load(out, mp=2, dtype="float32").generate_tokens([[1, 2, 3]], 8, temperature=0) == \
        lm.generate_tokens([[1, 2, 3]], 8, temperature=0)


def test_slim_bf16_v1_checkpoint(tmp_path):
    """The released GPT-J-6B weights are a slim checkpoint (no opt_state) in bfloat16."""
    import torch
    import transformers

    path = hf_gptj(tmp_path / "hf", vocab_size=1000, n_embd=32, n_head=4, rotary_dim=4, n_layer=LAYERS, **SHARP)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # bf16-exact weights, so the bf16 checkpoint holds them exactly
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(tmp_path / "hf_bf16")
    leaves = [leaf for leaf in v1_leaves(tmp_path / "hf_bf16", exact_sums=True) if not leaf[0].startswith("opt_state")]
    write_v1(tmp_path / "step_1", leaves, bf16=True)
    import_v1(tmp_path / "step_1", original_config(tmp_path / "tiny.json"), tmp_path / "imported")
    tokens = np.random.RandomState(0).randint(0, 1000, (2, 12))
    assert_logits_close(mtj.load(tmp_path / "imported", dtype="float32").logits(tokens),
                        hf_logits(tmp_path / "hf_bf16", tokens))


def test_bad_v1_inputs_are_named(hf_dir, tmp_path):
    step_dir = tmp_path / "step_1"
    write_v1(step_dir, v1_leaves(hf_dir, exact_sums=False))
    config = original_config(tmp_path / "tiny.json")
    with pytest.raises(ValueError, match="does --config"):  # wrong depth: the leaves do not line up
        import_v1(step_dir, original_config(tmp_path / "ten.json", layers=10), tmp_path / "a")
    with pytest.raises(ValueError, match="does --config"):  # wrong width
        import_v1(step_dir, original_config(tmp_path / "wide.json", d_model=64), tmp_path / "b")
    with pytest.raises(ValueError, match="'pe' must be 'rotary'"):
        import_v1(step_dir, original_config(tmp_path / "fixed.json", pe="fixed"), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="shard_2"):  # more shards claimed than written
        import_v1(step_dir, original_config(tmp_path / "mp4.json", cores_per_replica=4), tmp_path / "d")
    (step_dir / "shard_1" / "7.npz").unlink()
    with pytest.raises(FileNotFoundError, match="shard_1/7.npz"):
        import_v1(step_dir, config, tmp_path / "e")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("data")
    with pytest.raises(FileExistsError):
        import_v1(step_dir, config, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "data"
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abcde")
