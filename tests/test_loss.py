"""The hand-written gradients (blocked LM-head cross entropy, mixed-precision einsum) against autodiff."""

import jax
import jax.numpy as jnp
import pytest

import mtj.loss
from mtj.loss import head_cross_entropy
from mtj.ops import einsum_f32
from mtj.sharding import make_mesh

N, D, V, Z_LOSS = 64, 32, 512, 1e-3


def reference(x, kernel, bias, targets):
    logits = x @ kernel + bias
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0])
    return ce + Z_LOSS * jnp.mean(jnp.square(lse)), ce


def values_and_grads(loss):
    """Both outputs, and the gradients of each output (cotangent (1, 0) and (0, 1))."""
    def run(*args):
        grads = [jax.grad(lambda *a: loss(*a)[i], argnums=(0, 1, 2))(*args) for i in (0, 1)]
        return loss(*args), grads
    return run


@pytest.mark.parametrize("mesh_shape", [None, (2, 4), (1, 8), (8, 1)])
def test_head_cross_entropy_matches_autodiff(monkeypatch, mesh_shape):
    monkeypatch.setattr(mtj.loss, "BLOCK_BYTES", 64 * 64 * 4)  # several vocabulary blocks per device
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (N, D))
    kernel = jax.random.normal(keys[1], (D, V)) * 0.3
    bias = jax.random.normal(keys[2], (V,)).at[-7:].set(-1e30)  # padded vocabulary columns
    targets = jax.random.randint(keys[3], (N,), 0, V - 7)
    expected = jax.jit(values_and_grads(reference))(x, kernel, bias, targets)
    ours = jax.jit(values_and_grads(lambda *a: head_cross_entropy(*a, Z_LOSS)))
    if mesh_shape is None:
        got = ours(x, kernel, bias, targets)
    else:
        with jax.set_mesh(make_mesh(dp=mesh_shape[0], mp=mesh_shape[1])):
            got = ours(x, kernel, bias, targets)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert jnp.allclose(e, g, atol=1e-6, rtol=1e-5), float(jnp.max(jnp.abs(e - g)))


def test_blocks_divide_the_vocabulary_and_fit_the_budget():
    assert mtj.loss._blocks(8, 512) == 512  # small enough: one block
    for rows in (1, 100, 2048, 16384):
        width = mtj.loss._blocks(rows, 50432)
        assert 50432 % width == 0 and rows * width * 4 <= mtj.loss.BLOCK_BYTES


@pytest.mark.parametrize("spec,shapes", [("...i,io->...o", ((3, 5, 8), (8, 6))), ("bhts,bhsd->bthd", ((2, 3, 4, 4), (2, 3, 4, 5)))])
def test_einsum_f32_gradients(spec, shapes):
    keys = jax.random.split(jax.random.key(1), 3)
    a, b = (jax.random.normal(k, s) for k, s in zip(keys, shapes))
    out_grad = jax.random.normal(keys[2], jnp.einsum(spec, a, b).shape)
    f = lambda fn: jax.vjp(fn, a, b)[1](out_grad)  # noqa: E731
    expected = f(lambda a, b: jnp.einsum(spec, a, b))
    got = f(lambda a, b: einsum_f32(spec, a, b))
    for e, g in zip(expected, got):
        assert jnp.allclose(e, g, atol=1e-5)
    # bf16 operands: the output is fp32, the cotangents come back in bf16
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: einsum_f32(spec, a, b), a16, b16)
    assert y.dtype == jnp.float32
    da, db = vjp(out_grad)
    assert da.dtype == db.dtype == jnp.bfloat16
    assert jnp.allclose(da.astype(jnp.float32), expected[0], atol=0.1, rtol=0.05)
