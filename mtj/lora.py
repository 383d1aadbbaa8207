"""LoRA: low-rank adapters on a frozen base (config keys `lora_rank`, `lora_alpha`, `lora_dropout`,
`lora_targets`; `base_quant` for QLoRA).

An adapted projection computes x @ W + (alpha / rank) * dropout(x) @ A @ B, PEFT's definition, with A
[in, rank] drawn as PEFT draws it (uniform in +-1/sqrt(in)) and B [rank, out] zeros, so training starts
from the base model. The modules (`mtj.model`) declare the adapters beside the kernels they adapt, as
`{kernel}_lora_a` / `{kernel}_lora_b` (e.g. layers.attn.q_lora_a), with logical axes through the same
rules table. Training keeps them apart from the base: `split` / `combine` move between one params dict
and (base, adapters); `merged` folds them into the kernels for inference and export.

Why not Qwix's LoRA (the library MaxText and Tunix use): it adds adapters to the matmuls it intercepts
inside a module's call, creating them on the first call. mtj's blocks run from their weights under a
`lax.scan` (nothing can be created there), and the output projections are applied outside their modules,
by the block, so that a parallel block reduces both branches over mp at once (`row_parallel_sum`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from mtj.config import Config

# config target -> (module, kernel) in the params dict
TARGETS: dict[str, tuple[str, str]] = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"),
                                       "out": ("attn", "o"), "ff_in": ("mlp", "fc_in"), "ff_out": ("mlp", "fc_out")}
SITES = {kernel: i for i, (_, kernel) in enumerate(TARGETS.values())}  # a kernel's number in its dropout keys
SUFFIXES = ("_lora_a", "_lora_b")


def enabled(cfg: Config) -> bool:
    return cfg.lora_rank > 0


def adapted_kernels(cfg: Config) -> set[str]:
    """The kernel names (q, k, v, o, fc_in, fc_out) that carry adapters under `cfg`."""
    return {TARGETS[t][1] for t in cfg.lora_targets} if enabled(cfg) else set()


def scale(cfg: Config) -> float:
    return cfg.lora_alpha / cfg.lora_rank


def is_adapter(name: Any) -> bool:
    return isinstance(name, str) and name.endswith(SUFFIXES)


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the params dict's leaves apart by name, each keeping the nesting (no empty dicts)."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            b, a = split(value)
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        else:
            (adapters if is_adapter(key) else base)[key] = value
    return base, adapters


def combine(base: dict, adapters: dict) -> dict:
    """One params dict of the two parts of `split`."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def merged(params: dict, cfg: Config) -> dict:
    """`params` (stacked layers, with adapters) with every adapted kernel replaced by W + scale * A @ B in
    W's dtype (a quantized W's: the compute dtype) and the adapters dropped: the base model that computes
    what the adapted one does."""
    base, adapters = split(params)
    layers = {module: dict(weights) for module, weights in base["layers"].items()}
    for module, weights in adapters.get("layers", {}).items():
        for kernel in {name[: -len(SUFFIXES[0])] for name in weights}:
            a, b = weights[f"{kernel}_lora_a"], weights[f"{kernel}_lora_b"]
            w = layers[module][kernel]
            if isinstance(w, qwix.QArray):  # a QLoRA base: the merged kernel is in the compute dtype
                w = qwix.dequantize(w).astype(cfg.dtype)
            delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
            layers[module][kernel] = (w.astype(jnp.float32) + scale(cfg) * delta).astype(w.dtype)
    return {**base, "layers": layers}


def base_config(cfg: Config) -> Config:
    """The config of the frozen base (and of the merged model): no adapters."""
    return cfg.replace(lora_rank=0, base_quant="none")


# --- dropout while training ----------------------------------------------------------

class _Dropout(NamedTuple):
    key: jax.Array
    rate: float


_DROPOUT: contextvars.ContextVar[_Dropout | None] = contextvars.ContextVar("mtj_lora_dropout", default=None)


@contextlib.contextmanager
def dropout(key: jax.Array, rate: float) -> Iterator[None]:
    """Inside: the adapters' inputs are dropped at `rate` (a training step's trace sets it; the masks derive
    from `key`, the layer and the site, so a rematerialised layer draws the same ones)."""
    token = _DROPOUT.set(_Dropout(key, rate) if rate > 0 else None)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def delta(x: jax.Array, a: jax.Array, b: jax.Array, cfg: Config, kernel: str, layer: jax.Array | int | None) -> jax.Array:
    """scale * dropout(x) @ A @ B in fp32 (compute-dtype operands, as the base's product)."""
    active = _DROPOUT.get()
    if active is not None:
        key = jax.random.fold_in(jax.random.fold_in(active.key, 0 if layer is None else layer), SITES[kernel])
        keep = jax.random.bernoulli(key, 1.0 - active.rate, x.shape)
        x = jnp.where(keep, x / (1.0 - active.rate), 0).astype(x.dtype)
    low = jnp.einsum("...i,ir->...r", x, a.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    return scale(cfg) * jnp.einsum("...r,ro->...o", low, b.astype(x.dtype), preferred_element_type=jnp.float32)


# --- the base's identity ----------------------------------------------------------------

@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per leaf: a position-weighted sum of its values' bf16 bit patterns, modulo 2**32 (a reordering or a
    changed value changes it; the storage dtype, fp32 or bf16, does not)."""
    sums = []
    for leaf in leaves:
        bits = jax.lax.bitcast_convert_type(leaf.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
        position = jnp.zeros(bits.shape, jnp.uint32)  # (per axis: no flat index, which would pass 2**32)
        for axis in range(bits.ndim):
            position = position * jnp.uint32(2654435761) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        sums.append(jnp.sum(bits * (position * jnp.uint32(2246822519) | jnp.uint32(1)), dtype=jnp.uint32))
    return sums


def fingerprint(params: dict) -> str:
    """A content hash of a base model's weights (their values as bf16, wherever they are sharded): an adapter
    checkpoint stores it with the base's path, and loading it checks the base found there."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sums = _leaf_sums([leaf for _, leaf in flat])
    digest = hashlib.sha256()
    for (path, leaf), total in zip(flat, sums):
        digest.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{int(np.asarray(total))};".encode())
    return digest.hexdigest()[:32]
