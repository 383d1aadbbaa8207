"""Next-token cross entropy fused with the LM head, with a hand-written backward pass.

Autodiff of `softmax(x @ W + b)` differentiates in fp32 against an fp32 copy
of W and materialises several [tokens, vocab] temporaries; this version keeps
one fp32 [tokens, vocab] buffer and runs the backward matmuls in the compute dtype with
fp32 accumulation (2-3x faster on CPU, and less memory everywhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtj.model import _sum_leading


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_cross_entropy(x: jax.Array, kernel: jax.Array, bias: jax.Array, targets: jax.Array,
                       z_loss: float) -> tuple[jax.Array, jax.Array]:
    """(mean cross entropy + z_loss * mean logsumexp^2, mean cross entropy) for x [N, D], targets [N]."""
    return _forward(x, kernel, bias, targets, z_loss)[0]


def _forward(x, kernel, bias, targets, z_loss):
    # The bias is added inside each consumer rather than materialised with the
    # matmul output: one fewer pass over the [tokens, vocab] buffer.
    raw = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(raw + bias, axis=-1)
    target = jnp.take_along_axis(raw, targets[:, None], axis=-1)[:, 0] + bias[targets]
    ce = jnp.mean(lse - target)
    return (ce + z_loss * jnp.mean(jnp.square(lse)), ce), (x, kernel, bias, targets, raw, lse)


def _backward(z_loss, res, grads):
    x, kernel, bias, targets, raw, lse = res
    g_total, g_ce = grads
    n = x.shape[0]
    probs = jnp.exp(raw + bias - lse[:, None])
    onehot = jnp.arange(raw.shape[-1])[None, :] == targets[:, None]
    # d(ce)/dlogits = probs - onehot; d(mean lse^2)/dlogits = 2 lse probs
    scale = (g_total + g_ce) / n
    dlogits = (probs - onehot) * scale + probs * (g_total * z_loss * 2 / n) * lse[:, None]
    dl = dlogits.astype(x.dtype)
    dx = jnp.dot(dl, kernel.astype(x.dtype).T, preferred_element_type=jnp.float32).astype(x.dtype)
    dkernel = jnp.dot(x.T, dl, preferred_element_type=jnp.float32).astype(kernel.dtype)
    return dx, dkernel, _sum_leading(dl).astype(bias.dtype), None


head_cross_entropy.defvjp(_forward, _backward)
