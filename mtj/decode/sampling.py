"""Sampling a token per row: the per-row values (`SamplingParams`), their one check, top-k/top-p filtering
by bisection and Gumbel-max sampling. The generator's batch loop and the slot engine's step both sample
through `sample`."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mtj.decode import cpu as cpu_decode

SEED_LIMIT = 2**32  # seeds are threefry keys' 32-bit words


class SamplingParams(NamedTuple):
    """Per-row sampling values, as device arrays [B] inside the decode loops (a pytree) or one row's
    numbers on the host: temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int, n_vocab: int) -> None:
    """Raise ValueError naming the value: the one check of sampling values, shared by the Python API,
    mtj-sample and the server's engines."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 <= top_k <= n_vocab:
        raise ValueError(f"top_k must be in [0, {n_vocab}] (the vocabulary size; 0 = off), got {top_k}")
    if not 0 < top_p <= 1:  # (nan fails too)
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^32), got {seed}")


def _largest_threshold(keys: jax.Array, enough: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per row of keys [B, V] (uint32): the largest t with enough(keys >= t) [B], found bit by bit
    from the top; `enough` must hold for t = 0 and only fail more as t grows. 32 passes over the
    keys: XLA:CPU sorts a 50k-wide row ~10x slower, and sorting was the cost of every sampled token."""
    def bit(i: jax.Array, t: jax.Array) -> jax.Array:
        candidate = t | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(enough(keys >= candidate[:, None]), candidate, t)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros(keys.shape[:1], jnp.uint32))


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative floats have their magnitude bits flipped)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jax.lax.bitcast_convert_type(jnp.where(i < 0, ~i, i | jnp.int32(-2**31)), jnp.uint32)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row: keep the top_k largest logits (0 = all), then the smallest set of the largest
    whose probability reaches top_p (1 = all); ties at either edge are kept; the rest become
    -inf. logits [B, V]. Each cut is a threshold found by bisection, not a sort."""
    V = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)

    def cut_k(logits: jax.Array) -> jax.Array:
        keys = _ordered_bits(logits)
        t = _largest_threshold(keys, lambda kept: jnp.sum(kept, axis=-1) >= k)
        return jnp.where(keys >= t[:, None], logits, -jnp.inf)

    def cut_p(logits: jax.Array) -> jax.Array:
        # probabilities are >= 0, so their bits are already ordered
        probs = jax.nn.softmax(logits, axis=-1)
        keys = jax.lax.bitcast_convert_type(probs, jnp.uint32)
        t = _largest_threshold(keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= top_p)
        return jnp.where((keys >= t[:, None]) | (top_p[:, None] >= 1.0), logits, -jnp.inf)

    logits = jax.lax.cond(jnp.any(k < V), cut_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(top_p < 1.0), cut_p, lambda x: x, logits)


def argmax(x: jax.Array) -> jax.Array:
    """Index of the first largest value of each row of x [B, V], int32 (on CPU the blocked kernel)."""
    if cpu_decode.enabled():
        return cpu_decode.blocked_argmax(x)
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, keys: jax.Array, sampling: SamplingParams) -> jax.Array:
    """One token per row of logits [B, V], with the row's RNG key and values; temperature 0 is greedy.
    (All-greedy batches never get here: the decode loops compile them without sampling.)"""
    temperature = sampling.temperature
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = filter_logits(scaled, sampling.top_k, sampling.top_p)
    # the Gumbel-max trick, as jax.random.categorical does it
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[1:]))(keys)
    return jnp.where(temperature > 0, argmax(scaled + gumbel), argmax(logits))
