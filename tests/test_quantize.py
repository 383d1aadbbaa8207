"""Quantized inference (config key `quantize`): the products, the quality on a trained model, sharding."""

import json
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import mtj
from mtj import cpu_matmul
from conftest import REPO, SHARP, assets, hf_gptj
from mtj.config import ConfigError, from_dict
from mtj.quantize import INT4_GROUP, is_quantized, matmul, quantize_array
from mtj.cpu_matmul import is_packed
from mtj.sharding import make_mesh
from mtj.tokenizer import load_tokenizer
from mtj.train import train
from mtj.workflows import export_hf, slim
from test_serve import Running, alone, request

TRAIN_BYTES = 900_000  # of tinyshakespeare; the rest is held out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small GPT-J trained on the first 900 KB of tinyshakespeare (the demo's recipe, shorter: 100 steps of 8
    sequences, on one device), and the held-out rest's tokens."""
    root = tmp_path_factory.mktemp("quantize")
    text = (assets() / "text" / "tinyshakespeare.txt").read_text()
    (root / "train.txt").write_text(text[:TRAIN_BYTES])
    cfg = from_dict(dict(layers=2, d_model=128, n_heads=4, pe_rotary_dims=16, n_vocab=50257, seq=128,
                         per_replica_batch=8, cores_per_replica=1, lr=3e-3, end_lr=3e-4, warmup_steps=20,
                         anneal_steps=80, total_steps=100, dtype="float32", tokenizer="gpt2", scan_layers=False,
                         train_set=str(root / "train.txt"), model_dir=str(root / "run"), ckpt_every=0, seed=1))
    train(cfg, progress=False, mesh=make_mesh(mp=1, dp=1))
    held_out = load_tokenizer("gpt2").encode(text[TRAIN_BYTES:])
    return root / "run", np.asarray(held_out, np.int32)


def perplexity(lm, tokens: np.ndarray, windows: int = 16, width: int = 128) -> float:
    rows = tokens[: windows * (width + 1)].reshape(windows, width + 1)
    logits = lm.logits(rows[:, :-1])
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), rows[:, 1:, None], axis=-1).mean()
    return float(np.exp(nll))


def test_quantized_models_keep_their_quality(trained):
    """Held-out perplexity within +1% (int8) and +5% (int4) of the model's own; greedy int8 continuations of 50
    held-out prompts equal the unquantized ones in at least 90% of cases (64 new tokens each)."""
    run, held_out = trained
    full = mtj.load(run, dtype="float32")
    base = perplexity(full, held_out)
    assert base < 1000, base  # it learned something
    int8, int4 = (mtj.load(run, dtype="float32", quantize=q) for q in ("int8", "int4"))
    assert perplexity(int8, held_out) <= 1.01 * base
    assert perplexity(int4, held_out) <= 1.05 * base
    head = int8.params["lm_head"]["kernel"]  # int8 kernels: packed for mtj's CPU matmul where it runs
    assert is_packed(head) if cpu_matmul.enabled(int8.mesh) else is_quantized(head)
    assert is_quantized(int4.params["layers"][0]["mlp"]["fc_out"])
    starts = np.linspace(0, len(held_out) - 100, 50).astype(int)
    prompts = [held_out[s: s + 16].tolist() for s in starts]
    same = [a == b for a, b in zip(int8.generate_tokens(prompts, 64, temperature=0),
                                  full.generate_tokens(prompts, 64, temperature=0))]
    assert np.mean(same) >= 0.9, np.mean(same)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_quantized_product_is_the_dequantized_kernels(kind):
    """`matmul` of a quantized kernel equals x @ (integers * scales), and those are within half a step of the
    kernel's values (a step: the largest magnitude of the channel, or of its int4 group, over 127 or 7)."""
    w = jax.random.normal(jax.random.key(0), (2 * INT4_GROUP, 96)) * jnp.linspace(0.1, 3, 96)
    x = jax.random.normal(jax.random.key(1), (3, 2 * INT4_GROUP))
    q = quantize_array(w, kind, rows_axis=0)
    values = q.qvalue.astype(jnp.float32) * jnp.repeat(q.scale, w.shape[0] // q.scale.shape[0], axis=0)
    levels = 127 if kind == "int8" else 7
    groups = w.reshape(-1, INT4_GROUP if kind == "int4" else w.shape[0], 96)
    step = jnp.repeat(jnp.abs(groups).max(axis=1) / levels, groups.shape[1], axis=0)
    assert jnp.all(jnp.abs(values - w) <= 0.5001 * step)
    np.testing.assert_allclose(matmul(x, q), x @ values, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_sharded_quantized_models_equal_one_device(tmp_path, monkeypatch, kind):
    """(One device through XLA's dot, as mp=2 runs: mtj's CPU matmul is compared with it in test_cpu_matmul.)"""
    path = hf_gptj(tmp_path / "hf", vocab_size=1000, n_positions=64, n_embd=256, n_head=4, rotary_dim=8, n_layer=2,
                   **SHARP)
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 12))
    monkeypatch.setenv("MTJ_CPU_KERNELS", "0")
    one = mtj.load(path, dtype="float32", quantize=kind)
    two = mtj.load(path, mp=2, dtype="float32", quantize=kind)
    np.testing.assert_allclose(two.logits(tokens), one.logits(tokens), rtol=1e-5, atol=1e-4)
    assert two.generate_tokens(tokens[:, :5].tolist(), 12, temperature=0) == \
        one.generate_tokens(tokens[:, :5].tolist(), 12, temperature=0)


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ConfigError, match="config key 'quantize' must be one of"):
        from_dict({"quantize": "int3"})


def test_serving_and_sampling_give_the_quantized_models_tokens(tmp_path):
    """mtj-serve (both engines) and mtj-sample with --quantize answer what `mtj.load(quantize=...)` generates."""
    path = hf_gptj(tmp_path / "hf", vocab_size=50257, n_positions=128, n_embd=128, n_head=4, rotary_dim=8, n_layer=2,
                   bos_token_id=50256, eos_token_id=50256, **SHARP)
    load_tokenizer("gpt2").save_pretrained(path)
    prompt = "The quantized weights"
    for kind, engine in (("int8", "continuous"), ("int4", "static")):
        expected = alone(mtj.load(path, quantize=kind), prompt, 16)
        assert expected != alone(mtj.load(path), prompt, 16)  # (the quantization shows in these tokens)
        server = Running(path, "--quantize", kind, "--engine", engine)
        try:
            status, body = request(server.port, "/complete", {"context": prompt, "temp": 0, "length": 16})
        finally:
            assert server.stop() == 0
        assert status == 200 and json.loads(body)["completion"] == expected, (kind, engine, body)
    sampled = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--ckpt", str(path), "--prompt",
                              prompt, "--max-new-tokens", "16", "--temperature", "0", "--quantize", "int4", "--json"],
                             capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(sampled.stdout.splitlines()[-1])["completion"] == expected


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_quantized_slim_checkpoint_round_trips(trained, tmp_path):
    """`mtj-slim --quantize` stores the integers and scales (a fraction of the bytes); loading it, on one device
    or two, decodes the tokens of mtj.load(quantize=...) on the original; it is refused where it cannot serve."""
    run, held_out = trained
    prompts = [held_out[i: i + 8].tolist() for i in range(0, 400, 100)]
    sizes = {}
    for kind in ("none", "int8", "int4"):
        out = tmp_path / kind
        # the quantized ones keep the rest in float32, as mtj.load(quantize=...) does: the same weights, bit for bit
        # (in bf16 the norms and biases would differ, and a near tie of this little-trained model with them)
        subprocess.run([sys.executable, str(REPO / "scripts" / "slim.py"), "--ckpt", str(run), "--out", str(out),
                        "--quantize", kind, *(["--dtype", "fp32"] if kind != "none" else [])],
                       capture_output=True, text=True, cwd=REPO, check=True)
        sizes[kind] = _size(out)
        if kind == "none":
            continue
        want = mtj.load(run, dtype="float32", quantize=kind).generate_tokens(prompts, 16, temperature=0)
        stored = mtj.load(out, dtype="float32")
        assert stored.config.quantize == kind and stored.generate_tokens(prompts, 16, temperature=0) == want
        assert mtj.load(out, mp=2, dtype="float32").generate_tokens(prompts, 16, temperature=0) == want
    # (measured: bf16 21.4 MB, int8 14.8 MB, int4 8.1 MB; Orbax's compression shrinks bf16 more than integers)
    assert sizes["int8"] < 0.75 * sizes["none"] and sizes["int4"] < 0.6 * sizes["int8"], sizes
    with pytest.raises(ConfigError, match="int8-quantized weights"):
        mtj.load(tmp_path / "int8", quantize="none")
    for refused in (lambda: export_hf(tmp_path / "int8", tmp_path / "hf"), lambda: slim(tmp_path / "int8", tmp_path / "x")):
        with pytest.raises(ConfigError, match="int8-quantized weights"):
            refused()
    trained_on = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", "configs/demo.json",
                                 "--tune-model-path", str(tmp_path / "int8"), f"model_dir={tmp_path / 'run'}",
                                 f"train_set={run.parent / 'train.txt'}", "val_set={}"], capture_output=True, text=True,
                                cwd=REPO)
    assert trained_on.returncode == 1 and "int8-quantized weights (mtj-slim --quantize)" in trained_on.stderr, \
        trained_on.stderr[-2000:]
