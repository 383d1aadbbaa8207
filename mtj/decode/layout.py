"""The weights as decoding reads them (`LM.use_decode_layout` applies it to an LM's own, once): the layers
one tree each and q/k/v joined (`mtj.model.Layout`), matmul kernels in the compute dtype (or quantized, with
the embedding table: `mtj.quantize`), a tied head as its own kernel; on one CPU device, int8 and bf16
kernels packed for mtj's CPU matmul (`mtj.cpu_matmul`)."""

from __future__ import annotations

import functools
from typing import Any

import jax

from mtj import cpu_matmul
from mtj.model import Layout, Params, join_qkv, joins_qkv, output_head
from mtj.quantize import KERNELS, is_weight, quantize_weights

COMPUTE_CAST = {"q", "k", "v", "o", "fc_in", "fc_out", "kernel"}  # matmul kernels: cast to the compute dtype at every use


def decode_layout(params: Params, cfg: Any) -> Params:
    """The weights as the decode step reads them, made once: the matmul kernels in the compute
    dtype (the model casts them at every use, to the same values, so a step would otherwise re-cast
    the whole head each token), a tied head as its own kernel, and the layers unstacked (see
    `unstack_layers`: no slice or q/k/v join per step). Biases and LayerNorm parameters enter fp32
    arithmetic and stay; so do the embedding tables, which are gathered from (XLA:CPU gathers from a
    bf16 table by converting all of it to fp32 first: 50k x 256 took ~10 ms a call).

    Made one layer-stacked array at a time, each deleted once cut into its layers, so that making them
    takes the weights' memory plus the largest array's, not twice the weights' (a 6B in bf16 on a 24 GB
    GPU): `params`' layer arrays are consumed. Call under the model's mesh."""
    cast = cfg.quantize == "none"  # (kernels to be quantized are, from their stored values)

    def dtype(path: tuple, a: jax.Array) -> Any:
        return cfg.dtype if cast and path[-1].key in COMPUTE_CAST else a.dtype

    out = jax.tree_util.tree_map_with_path(lambda path, a: a.astype(dtype(path, a)) if isinstance(a, jax.Array) else a,
                                           {k: v for k, v in params.items() if k != "layers"}, is_leaf=is_weight)
    layout = Layout.of(params)
    if layout.tied:
        kernel = output_head(params, cfg)[0]
        out["lm_head"] = {"kernel": kernel.astype(cfg.dtype) if cast else kernel}
    if not layout.stacked:  # already per layer (made before)
        return _quantized({**out, "layers": params["layers"]}, cfg)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params["layers"], is_leaf=is_weight)
    per_layer: list[list[jax.Array]] = [[] for _ in range(cfg.layers)]
    for path, stacked in leaves:  # (arrays, or the QArrays of a quantized checkpoint)
        for i, piece in enumerate(_cut(stacked, dtype(path, stacked))):
            per_layer[i].append(piece)
        jax.tree.map(lambda a: a.delete(), stacked)
    layers = {i: jax.tree_util.tree_unflatten(tree, pieces) for i, pieces in enumerate(per_layer)}
    if joins_qkv():
        for layer in layers.values():
            apart, layer["attn"] = layer["attn"], _join_qkv(layer["attn"])
            jax.tree.map(lambda a: a.delete(), [apart[name] for name in ("q", "k", "v")])
    return _quantized({**out, "layers": layers}, cfg)


def _quantized(params: Params, cfg: Any) -> Params:
    """Kernels quantized as `cfg` says, then packed for the CPU matmul where it runs."""
    if cfg.quantize != "none":
        params = quantize_weights(params, cfg.quantize)
    leaves = jax.tree.leaves(params, is_leaf=is_weight)
    if not any(map(cpu_matmul.packable, leaves)) or not cpu_matmul.enabled(jax.sharding.get_abstract_mesh()):
        return params

    def pack(path: tuple, a: Any) -> Any:
        if path[-1].key not in KERNELS or not cpu_matmul.packable(a):
            return a
        packed = cpu_matmul.pack(a)
        jax.tree.map(lambda leaf: leaf.delete(), a)  # (consumed: the weights are held once)
        return packed

    return jax.tree_util.tree_map_with_path(pack, params, is_leaf=is_weight)


@functools.partial(jax.jit, static_argnums=1)
def _cut(stacked: jax.Array, dtype: Any) -> tuple[jax.Array, ...]:
    """A layer-stacked array's layers, in `dtype`."""
    return tuple(stacked[i].astype(dtype) for i in range(stacked.shape[0]))


_join_qkv = jax.jit(join_qkv)
