"""Quantized inference weights (config key `quantize`): the matmul kernels, the LM head and the embedding table
held as Qwix's `QArray` (integer values and their scales), read by `matmul` and `embed`.

- int8: one scale per output channel (per row of the embedding table), so a product is the integer kernel's
  product scaled afterwards (exact arithmetic on the integers: they fit bf16).
- int4: one scale per output channel and group of `INT4_GROUP` input rows, so the kernel is dequantized
  before its product (XLA fuses that into the matmul on TPUs and GPUs).

Weights are quantized from their stored (param_dtype) values once, at load, in the decode layout
(`mtj.decode.layout`), the layout every inference path reads.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from qwix import QArray

INT4_GROUP = 128  # input rows sharing an int4 scale (the usual group size: GPTQ's, llama.cpp's Q4 blocks are 32)
NF4_GROUP = 64  # input rows sharing an nf4 scale (QLoRA's block size)
KERNELS = {"q", "k", "v", "qkv", "o", "fc_in", "fc_out", "kernel"}  # [in, out] matmul kernels ("kernel": the head)
BLOCK_KERNELS = {"q", "k", "v", "o", "fc_in", "fc_out"}  # what QLoRA quantizes (`base_quant`): the layers' kernels
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
GROUPS = {"int4": INT4_GROUP, "nf4": NF4_GROUP}


def group_size(rows: int, group: int = INT4_GROUP) -> int:
    """The group of a kernel with `rows` input rows: `group`, or (small models) the largest common divisor of
    the two."""
    return math.gcd(rows, group) if rows % group else group


def quantize_array(w: jax.Array, kind: str, rows_axis: int) -> QArray:
    """`w` quantized symmetrically (absmax): every axis but `rows_axis` (the contraction) gets its own scales;
    int4 and nf4 also per group of rows. Scales stay fp32."""
    others = tuple(a for a in range(w.ndim) if a != rows_axis)
    tiles = {rows_axis: group_size(w.shape[rows_axis], GROUPS[kind])} if kind in GROUPS else None
    return qwix.quantize(w.astype(jnp.float32), QTYPES[kind], channelwise_axes=others, tiled_axes=tiles)


def quantize_weights(params: dict, kind: str, names: set[str] | None = None, consume: bool = False) -> dict:
    """The weights with every matmul kernel and the embedding table (or the leaves called one of `names`)
    quantized to `kind`, one array at a time (so the temporaries are one array's); biases, norms, learned
    positions and kernels already quantized (or packed) stay as they are. `consume`: each original is deleted
    once quantized (the device holds the weights once, plus one array: a 6B's bf16 base becomes int8 on a
    16 GiB chip)."""
    def quantize(path: tuple, a: Any) -> Any:
        rows = rows_axis(path[-1].key, a.ndim, names) if isinstance(a, jax.Array) else None
        if rows is None:
            return a
        quantized = _quantize(a, kind, rows)
        if consume:
            a.delete()
        return quantized

    return jax.tree_util.tree_map_with_path(quantize, params, is_leaf=is_weight)


def rows_axis(name: str, ndim: int, names: set[str] | None = None) -> int | None:
    """The contraction axis of a weights leaf called `name` that is quantized (any of `names` if given), None
    for one that is not: a kernel's rows are its inputs; the embedding table is gathered by row and (tied)
    read transposed."""
    if names is not None and name not in names:
        return None
    if name in KERNELS:
        return ndim - 2
    return ndim - 1 if name == "wte" else None


def abstract_weights(abstract: dict, kind: str, names: set[str] | None = None) -> dict:
    """The ShapeDtypeStructs of `quantize_weights(params, kind)` for `abstract` (params' ShapeDtypeStructs
    with shardings: restoring onto them places a quantized checkpoint). The integers are sharded as the
    weights were; scales along the weights' sharded axes where they have the same length there."""
    def quantized(path: tuple, a: jax.ShapeDtypeStruct) -> Any:
        rows = rows_axis(path[-1].key, len(a.shape), names)
        if rows is None:
            return a
        shapes = jax.eval_shape(functools.partial(quantize_array, kind=kind, rows_axis=rows), a)
        spec = tuple(a.sharding.spec) + (None,) * (len(a.shape) - len(a.sharding.spec))
        scale_spec = [axis if n == full else None for axis, n, full in zip(spec, shapes.scale.shape, a.shape)]
        scale = jax.sharding.NamedSharding(a.sharding.mesh, jax.sharding.PartitionSpec(*scale_spec))
        return QArray(jax.ShapeDtypeStruct(a.shape, shapes.qvalue.dtype, sharding=a.sharding),
                      jax.ShapeDtypeStruct(shapes.scale.shape, shapes.scale.dtype, sharding=scale), qtype=shapes.qtype)

    return jax.tree_util.tree_map_with_path(quantized, abstract)


_quantize = jax.jit(quantize_array, static_argnums=(1, 2))


def is_weight(a: Any) -> bool:
    """A leaf of a weights tree (nested dicts): an array, a `QArray` or another inference kernel."""
    return not isinstance(a, dict)


def is_quantized(w: Any) -> bool:
    return isinstance(w, QArray)


def matmul(x: jax.Array, w: QArray) -> jax.Array:
    """x [..., in] @ w [in, out] in fp32 (compute-dtype operands) for a quantized kernel."""
    if w.scale.shape[-2] == 1 and w.qtype != "nf4":  # one scale per output channel: scale the integer product
        y = jnp.einsum("...i,io->...o", x, w.qvalue.astype(x.dtype), preferred_element_type=jnp.float32)
        return y * w.scale[0].astype(jnp.float32)
    kernel = qwix.dequantize(QArray(w.qvalue, w.scale.astype(x.dtype), qtype=w.qtype))
    return jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=jnp.float32)


def embed(table: QArray, tokens: jax.Array) -> jax.Array:
    """Rows `tokens` of a quantized table [V, d], dequantized (fp32)."""
    rows = QArray(jnp.take(table.qvalue, tokens, axis=0), jnp.take(table.scale, tokens, axis=0), qtype=table.qtype)
    return qwix.dequantize(rows)
