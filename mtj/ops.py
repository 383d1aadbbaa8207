"""Mixed-precision matmul: compute-dtype operands, fp32 accumulation, in both passes.

Autodiff of `einsum(a, b, preferred_element_type=f32)` with bf16 operands
receives an fp32 cotangent and so runs the two backward matmuls in fp32 (2-4x
slower on CPU, 2x the memory traffic everywhere). Here the cotangent is cast to
the operands' dtype first, as PyTorch autocast and Megatron do; the products
still accumulate in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtj import cpu_matmul, quantize


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` in fp32 for a two-operand `spec` with an explicit output ('ab,bc->ac')."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _backward(spec, res, g):
    a, b = res
    inputs, out = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{out},{spec_b}->{spec_a}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{spec_a},{out}->{spec_b}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


einsum_f32.defvjp(_forward, _backward)


def matmul_f32(x: jax.Array, w: jax.Array | quantize.QArray | cpu_matmul.PackedKernel) -> jax.Array:
    """x [..., in] @ w [in, out] in fp32 with compute-dtype operands (`einsum_f32`); the inference kernels,
    quantized or packed, through `quantize.matmul` and `cpu_matmul.matmul`."""
    if quantize.is_quantized(w):
        return quantize.matmul(x, w)
    if cpu_matmul.is_packed(w):
        return cpu_matmul.matmul(x, w)
    return einsum_f32("...i,io->...o", x, w.astype(x.dtype))
