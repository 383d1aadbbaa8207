"""mtj's CPU matmul (mtj/cpu_matmul.cc): packed int8 and bf16 kernels give XLA's products, decoding with
them gives the tokens of XLA's dot, and it is built wherever the CPU has the instructions it needs."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import mtj
from conftest import MISSING_CPU_FEATURE, SHARP, hf_gptj
from mtj import cpu_matmul, platforms
from mtj.quantize import matmul as quantized_matmul, quantize_array

HAS_INSTRUCTIONS = all(f in platforms.cpu_flags() for f in cpu_matmul.FLAGS)


def test_it_is_built_and_used_where_the_cpu_can_run_it(tmp_path):
    assert (cpu_matmul._library() is not None) == HAS_INSTRUCTIONS
    hf = hf_gptj(tmp_path / "hf", n_layer=1, n_embd=64, n_head=4, rotary_dim=8, vocab_size=300)
    assert cpu_matmul.is_packed(mtj.load(hf, dtype="bfloat16").params["lm_head"]["kernel"]) == HAS_INSTRUCTIONS


needs_kernel = pytest.mark.skipif(not HAS_INSTRUCTIONS, reason=f"{MISSING_CPU_FEATURE}AVX-512 VNNI/BF16")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64, 65])
@pytest.mark.parametrize("k, n", [(96, 384), (257, 1000), (1024, 130), (64, 20000)])
def test_packed_products_equal_xlas(rows, k, n):
    """int8 (16-bit activations: relative error ~3e-5 of the largest output) and bf16 (fp32 accumulation in
    another order), for batch shapes on both sides of MAX_ROWS, odd k and n not a multiple of the panel."""
    rng = np.random.default_rng(rows * k + n)
    x = jnp.asarray(rng.standard_normal((rows, 1, k)) * rng.uniform(0.1, 10, (rows, 1, 1)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)) * rng.uniform(0.01, 1, n), jnp.float32)
    q = quantize_array(w, "int8", 0)
    want = np.asarray(quantized_matmul(x, q))
    got = np.asarray(jax.jit(cpu_matmul.matmul)(x, cpu_matmul.pack(q)))
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got - want).max(axis=-1).min() > 0 or rows > cpu_matmul.MAX_ROWS  # (not XLA's own product)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    want = np.asarray(jnp.einsum("...i,io->...o", xb, wb, preferred_element_type=jnp.float32))
    got = np.asarray(jax.jit(cpu_matmul.matmul)(xb, cpu_matmul.pack(wb)))
    assert got.shape == want.shape and np.abs(got - want).max() <= 2e-6 * np.abs(want).max() * np.sqrt(k)


@needs_kernel
def test_packing_round_trips():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((257, 1000)), jnp.bfloat16)
    assert (cpu_matmul.unpack(cpu_matmul.pack(w)) == w).all()
    q = quantize_array(w, "int8", 0)
    assert (cpu_matmul.unpack(cpu_matmul.pack(q)) == q.qvalue).all()


@needs_kernel
@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("float32", "int8")])
def test_decoding_with_packed_kernels_gives_xlas_tokens(tmp_path, monkeypatch, dtype, quantize):
    """Greedy tokens of a sharp random GPT-J with packed kernels equal those of the same weights through
    XLA's dot (MTJ_CPU_KERNELS=0), batch 1 and 5."""
    hf = hf_gptj(tmp_path / "hf", n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=300, **SHARP)
    prompts = [[int(t) for t in np.random.default_rng(i).integers(0, 300, 5 + 3 * i)] for i in range(5)]
    packed = mtj.load(hf, dtype=dtype, quantize=quantize)
    assert cpu_matmul.is_packed(packed.params["layers"][0]["mlp"]["fc_in"])
    monkeypatch.setenv("MTJ_CPU_KERNELS", "0")
    plain = mtj.load(hf, dtype=dtype, quantize=quantize)
    assert not cpu_matmul.is_packed(plain.params["lm_head"]["kernel"])
    for batch in (prompts[:1], prompts):
        want = plain.generate_tokens(batch, max_new_tokens=24, temperature=0.0)
        got = packed.generate_tokens(batch, max_new_tokens=24, temperature=0.0)
        assert got == want
