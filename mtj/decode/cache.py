"""The KV cache of every decode path: what it holds (`cache_dtype`, the one rule) and its empty form
(`empty_cache`): per layer a (keys, values) pair [batch, heads, length, head_dim], heads-major so that
attention reads it without a transpose; or, for deep models scanned over stacked layers, one pair with a
leading layer axis."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtj import platforms
from mtj.config import Config
from mtj.sharding import constrain


def cache_dtype(cfg: Config) -> jnp.dtype:
    """What the cache holds. XLA:CPU updates a bf16 array by converting all of it to fp32 and back
    (measured: a per-row write into 8 layers' 2 MB bf16 caches cost 2-4 ms a step, in fp32 0.05 ms), so on
    CPU the cache is fp32; the values written are those of the compute dtype and attention reads them back
    in it, so the result is the same."""
    return jnp.dtype(jnp.float32 if platforms.platform().cache_float32 else cfg.dtype)


def empty_cache(cfg: Config, batch: int, length: int, stacked: bool = False, sharded: bool = True) -> Any:
    """Zeros: a list of per-layer (k, v), or (`stacked`) one (k, v) of [layers, ...]. `sharded`: rows over the
    mesh's data axis and heads over its model axis (a one-row prefill's cache is not)."""
    lead = (cfg.layers,) if stacked else ()

    def zeros() -> jax.Array:
        z = jnp.zeros((*lead, batch, cfg.n_heads, length, cfg.head_dim), cache_dtype(cfg))
        return constrain(z, *[None] * len(lead), "batch", "heads", None, None) if sharded else z

    return (zeros(), zeros()) if stacked else [(zeros(), zeros()) for _ in range(cfg.layers)]
