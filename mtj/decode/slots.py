"""The continuous engine's compiled verbs, pure functions over the weights (in their decode layout,
`mtj.decode.layout`), the slots' KV cache and a `Slots` record (JetStream's split: the scheduler in
mtj.serve.scheduler decides what runs when):

- `init_cache`: every slot's empty cache row;
- `prefill`: one prompt's keys and values; `insert`: them into a slot's row;
- `decode`: up to MAX_STEPS tokens for every slot, each at its own position with its own sampling values
  (`decode_speculative`: up to MAX_STEPS speculative steps, drafts looked up or from a draft model);
- with a prefix cache: `init_pool`, `save` (a row's positions into the pool), `extend` (a prefill that starts
  from positions in the pool).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtj.decode import penalties, speculative
from mtj.decode.cache import cache_dtype, empty_cache
from mtj.decode.draft import propose_rows
from mtj.decode.generator import bucket
from mtj.decode.sampling import SamplingParams, argmax, sample
from mtj.model import Params, logits_of, run_layers
from mtj.sharding import constrain

SPAN_MIN = 64  # the shortest cache prefix a decode call attends to (spans are powers of two up to seq)
MAX_STEPS = 8  # decode steps one call may take before the host looks at the slots again


def powers_of_two(lowest: int, top: int) -> list[int]:
    """lowest, 2 * lowest, ... (lowest a power of two) up to top, and top last."""
    return sorted({min(bucket(2 ** i, lowest), top) for i in range(top.bit_length() + 1)})


def right_padded(ids: list[int], size: int) -> jax.Array:
    """A prompt's ids as [1, size] (size >= len(ids)), zeros after them."""
    padded = np.zeros((1, size), np.int32)
    padded[0, :len(ids)] = ids
    return jnp.asarray(padded)


def prefill(params: Params, tokens: jax.Array, cfg: Any) -> list:
    """The per-layer (k, v) [1, H, P, Dh] of a prompt's tokens but its last (which the slot's first
    decode step reads, so the first new token comes from the decode step like every other)."""
    cache = empty_cache(cfg, 1, tokens.shape[1], sharded=False)
    return run_layers(params, tokens, cfg, cache=cache, index=0)[1]


def insert(cache: list, prompt_cache: list, slot: jax.Array) -> list:
    """The slot's cache row starts with the prompt's keys and values."""
    put = lambda big, small: jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (slot, 0, 0, 0))  # noqa: E731
    return [(put(k, pk), put(v, pv)) for (k, v), (pk, pv) in zip(cache, prompt_cache)]


def init_cache(cfg: Any, slots: int, length: int | None = None) -> list:
    """Every slot's empty cache row, made on the devices: per layer (k, v) [slots, H, length (default seq), Dh]."""
    return jax.jit(lambda: empty_cache(cfg, slots, length or cfg.seq))()


class Slots(NamedTuple):
    """What a decode call needs to know of every slot (free ones included)."""
    tokens: jax.Array  # [S] the last token, decoded next
    lengths: jax.Array  # [S] tokens in the slot's cache: the next one goes at this position
    budget: jax.Array  # [S] tokens the slot may still take (max_tokens, room in the context)
    live: jax.Array  # [S] holds a request
    counts: jax.Array  # [S] tokens the slot has generated: its next RNG stream
    keys: jax.Array  # [S] RNG keys
    sampling: SamplingParams
    penalties: jax.Array  # [S, 3] repetition, presence and frequency penalties (with `penalties.Rows`: neutral or not)


def decode(params: Params, cache: list, slots: Slots, steps: jax.Array, eos: jax.Array, rows: penalties.Rows, *,
           cfg: Any, span: int, greedy: bool) -> tuple[jax.Array, jax.Array, list, penalties.Rows]:
    """Up to `steps` (<= MAX_STEPS) tokens for every slot, [MAX_STEPS, S], how many steps ran, the cache and the
    slots' logit adjustments (`rows`: neutral ones leave the logits as they are). The loop stops early after a step
    in which a live slot ended (EOS or its budget), so its slot is free at once. Every slot's tokens stay within
    the cache's first `span` positions."""
    S = slots.tokens.shape[0]

    def running(carry: tuple) -> jax.Array:
        return (carry[0] < steps) & ~jnp.any(carry[-1])

    def step(carry: tuple) -> tuple:
        i, tokens, lengths, cache, seen, out, ended = carry
        valid = jnp.arange(span)[None, :] <= lengths[:, None]
        x, cache = run_layers(params, tokens[:, None], cfg, lengths[:, None], valid, cache, lengths)
        logits = penalties.apply(logits_of(params, x[:, 0], cfg), penalties.of_rows(rows, slots.penalties), seen)
        if greedy:  # known on the host: no sampling at all
            tokens = argmax(logits)
        else:
            keys = jax.vmap(jax.random.fold_in)(slots.keys, slots.counts + i)
            tokens = sample(logits, keys, slots.sampling)
        ended = slots.live & ((tokens == eos) | (i + 1 >= slots.budget))
        return i + 1, tokens, lengths + 1, cache, penalties.add(seen, tokens), out.at[i].set(tokens), ended

    start = (jnp.int32(0), slots.tokens, slots.lengths, cache, rows.seen, jnp.zeros((MAX_STEPS, S), jnp.int32),
             jnp.zeros(S, bool))
    ran, _, _, cache, seen, out, _ = jax.lax.while_loop(running, step, start)
    return out, ran, cache, rows._replace(seen=seen)


def decode_speculative(params: Params, cache: list, slots: Slots, history: jax.Array, steps: jax.Array,
                       eos: jax.Array, rows: penalties.Rows, draft_params: Params | None = None,
                       draft_cache: list | None = None, *, cfg: Any, span: int, greedy: bool, k: int,
                       draft_cfg: Any = None) -> tuple[jax.Array, jax.Array, jax.Array, list, list | None, penalties.Rows]:
    """As `decode`, each step verifying a k-token draft per slot (`mtj.decode.speculative`), looked up in the slot's
    own tokens or, with `draft_params` (of `draft_cfg`), drawn from a draft model whose cache `draft_cache` has a row
    per slot (`mtj.decode.draft.propose_rows`): [MAX_STEPS, S, k + 1] tokens, how many of them each slot took
    [MAX_STEPS, S], how many steps ran, the cache, the draft cache and the adjustments (each draft position sees the
    drafts before it as generated). `history` [S, seq]: each slot's tokens so far, its last one included. Every
    slot's tokens stay within the cache's first `span` positions."""
    S, T = slots.tokens.shape[0], k + 1
    j = jnp.arange(T)

    def running(carry: tuple) -> jax.Array:
        return (carry[0] < steps) & ~jnp.any(carry[-1])

    adjust = penalties.of_rows(rows, slots.penalties)

    def step(carry: tuple) -> tuple:
        i, tokens, lengths, made, history, cache, draft_cache, seen, out, took, _ = carry
        keys = None if greedy else jax.vmap(jax.random.fold_in)(slots.keys, slots.counts + made)
        if draft_params is None:
            (drafts, _), q = speculative.lookup(history, lengths + 1, k), None
        else:
            drafts, q, draft_cache = propose_rows(draft_params, draft_cfg, draft_cache, history, lengths, k, keys,
                                                  slots.sampling, span)
        valid = jnp.arange(span)[None, :] <= (lengths + k)[:, None]
        x, cache = run_layers(params, jnp.concatenate([tokens[:, None], drafts], axis=1), cfg,
                              lengths[:, None] + j, valid, cache, lengths)
        logits = penalties.apply_along(logits_of(params, x, cfg), adjust, seen, drafts)
        logits = logits[..., :cfg.n_vocab]  # (a draft model's q spans the vocabulary only)
        if greedy:
            emitted, count = speculative.accept_greedy(logits, drafts)
        else:
            emitted, count = speculative.accept_sampled(logits, drafts, keys, slots.sampling, q)
        first_eos = jnp.min(jnp.where(emitted == eos, j, T), axis=1)
        count = jnp.minimum(jnp.minimum(count, first_eos + 1), jnp.maximum(slots.budget - made, 1))
        ended = slots.live & ((first_eos < count) | (made + count >= slots.budget))
        at = jnp.where(j < count[:, None], lengths[:, None] + 1 + j, history.shape[1])  # past the end: dropped
        history = history.at[jnp.arange(S)[:, None], at].set(emitted, mode="drop")
        last = jnp.take_along_axis(emitted, count[:, None] - 1, axis=1)[:, 0]
        for position in range(T):
            seen = penalties.add(seen, emitted[:, position], position < count)
        return (i + 1, last, lengths + count, made + count, history, cache, draft_cache, seen, out.at[i].set(emitted),
                took.at[i].set(count), ended)

    zeros = jnp.zeros(S, jnp.int32)
    start = (jnp.int32(0), slots.tokens, slots.lengths, zeros, history, cache, draft_cache, rows.seen,
             jnp.zeros((MAX_STEPS, S, T), jnp.int32), jnp.zeros((MAX_STEPS, S), jnp.int32), jnp.zeros(S, bool))
    ran, _, _, _, _, cache, draft_cache, seen, out, took, _ = jax.lax.while_loop(running, step, start)
    return out, took, ran, cache, draft_cache, rows._replace(seen=seen)


# --- the prefix cache's pool (token rows of keys and values; `mtj.serve.prefix_cache` decides which are which) ---
def init_pool(cfg: Any, size: int) -> list:
    """`size` token positions of keys and values, made on the devices: per layer (k, v) [H, size, Dh]."""
    def zeros() -> jax.Array:
        return constrain(jnp.zeros((cfg.n_heads, size, cfg.head_dim), cache_dtype(cfg)), "heads", None, None)

    return jax.jit(lambda: [(zeros(), zeros()) for _ in range(cfg.layers)])()


def pool_bytes_per_token(cfg: Any) -> int:
    """What one cached token's keys and values take, all layers and heads together."""
    return 2 * cfg.layers * cfg.n_heads * cfg.head_dim * cache_dtype(cfg).itemsize


def save(pool: list, cache: list, slot: jax.Array, dest: jax.Array) -> list:
    """Copy the slot's row position i to pool position dest[i] [seq] (an index past the pool: not copied)."""
    put = lambda p, c: p.at[:, dest].set(jax.lax.dynamic_index_in_dim(c, slot, 0, False).astype(p.dtype), mode="drop")  # noqa: E731
    return [(put(pk, k), put(pv, v)) for (pk, pv), (k, v) in zip(pool, cache)]


def extend(params: Params, cache: list, pool: list, tokens: jax.Array, start: jax.Array, slot: jax.Array,
           load: jax.Array, dest: jax.Array, *, cfg: Any) -> tuple[list, list]:
    """Prefill with a cached prefix: the slot's row takes its first `start` positions from the pool
    (row position i from pool position load[i]), then the prompt's tokens [1, T] at positions start..start+T-1
    (start + T <= seq), then `save`s the row's positions named in `dest`. The cache and the pool."""
    row = [(k[:, load][None], v[:, load][None]) for k, v in pool]  # past `start`: overwritten before it is read
    positions = start + jnp.arange(tokens.shape[1])[None, :]
    _, row = run_layers(params, tokens, cfg, positions, cache=row, index=start)
    cache = insert(cache, row, slot)
    return cache, save(pool, cache, slot, dest)
