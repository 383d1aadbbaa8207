"""KV-cache generation: one compiled prefill + `lax.while_loop` decode per (batch, prompt, length) bucket.

Prompts are left-padded, so every row's last prompt token sits in the same
slot and one decode step serves the whole batch; positions count real tokens
only and padded key slots are masked. Sampling parameters are per row.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from mtj.config import Config
from mtj.model import Params, logits_of, run_layers, unstack_layers
from mtj.sharding import constrain

TokenSink = Callable[[int, np.ndarray], None]  # (step, new token per row)
UNROLL_LAYERS = 16  # decode loops of models up to this depth are unrolled over layers


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`): few shapes, few compilations."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row: keep the top_k largest logits (0 = all), then the smallest set whose
    probability reaches top_p (1 = all); the rest become -inf. logits [B, V]."""
    V = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    rank = jnp.arange(V)[None, :]
    ordered = jnp.where(rank < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # keep a token while the mass strictly before it is below top_p (the first is always kept)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    threshold = jnp.min(jnp.where(keep & (rank < k[:, None]), ordered, jnp.inf), axis=-1)
    return jnp.where(logits < threshold[:, None], -jnp.inf, logits)


def argmax(x: jax.Array) -> jax.Array:
    """Index of the first largest value of each row of x [B, V], int32.

    The largest value of each block of the row, then the argmax within the
    winning block: XLA:CPU's argmax of a 50k-wide row (a variadic reduce) costs
    ~5x this, which matters when it runs once per decoded token."""
    B, V = x.shape
    block = max(d for d in range(1, 257) if V % d == 0)
    if block < 32:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    blocks = x.reshape(B, V // block, block)
    which = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    within = jnp.argmax(jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0], axis=-1)
    return (which * block + within).astype(jnp.int32)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """One token per row; temperature 0 is greedy. (All-greedy batches never get here:
    the generator compiles them without sampling.)"""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))  # sorting the vocabulary is the costly part
    scaled = jax.lax.cond(needs_filter, lambda s: filter_logits(s, top_k, top_p), lambda s: s, scaled)
    # the Gumbel-max trick, as jax.random.categorical does it
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[1:]))(keys)
    return jnp.where(temperature > 0, argmax(scaled + gumbel), argmax(logits))


def _generate(params: Params, tokens: jax.Array, valid: jax.Array, max_new: jax.Array, temperature: jax.Array,
              top_k: jax.Array, top_p: jax.Array, seeds: jax.Array, eos: jax.Array, *, cfg: Config, new_slots: int,
              sink: Callable | None, greedy: bool) -> tuple[jax.Array, jax.Array]:
    B, P = tokens.shape
    S = P + new_slots
    def zeros(*layers: int) -> jax.Array:
        shape = (*layers, B, cfg.n_heads, S, cfg.head_dim)
        return constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), *[None] * len(layers), "batch", "heads", None, None)

    if cfg.layers <= UNROLL_LAYERS:  # per-layer caches updated in place: fastest decoding
        cache = [(zeros(), zeros()) for _ in range(cfg.layers)]
        params = unstack_layers(params, cfg)
    else:  # deep models: scanned layers over a stacked cache keep compile time flat
        cache = (zeros(cfg.layers), zeros(cfg.layers))
    key_valid = jnp.concatenate([valid, jnp.ones((B, new_slots), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    keys = jax.vmap(jax.random.key)(seeds)

    def pick(logits: jax.Array, step: jax.Array) -> jax.Array:
        if greedy:  # known on the host: no branch, and the head's bias add fuses into the argmax
            return argmax(logits)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        return sample(logits, step_keys, temperature, top_k, top_p)

    x, cache = run_layers(params, tokens, cfg, positions, key_valid, cache, 0)  # prefill
    token = pick(logits_of(params, x[:, -1], cfg), 0)
    if sink is not None:
        io_callback(sink, None, 0, token, ordered=True)
    out = jnp.zeros((B, new_slots), jnp.int32).at[:, 0].set(token)
    state = (jnp.int32(1), token, positions[:, -1] + 1, cache, out, token == eos)

    def cond(state: tuple) -> jax.Array:
        step, _, _, _, _, done = state
        return (step < max_new) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, token, pos, cache, out, done = state
        x, cache = run_layers(params, token[:, None], cfg, pos[:, None], key_valid, cache, P + step - 1)
        token = jnp.where(done, eos, pick(logits_of(params, x[:, 0], cfg), step))
        if sink is not None:
            io_callback(sink, None, step, token, ordered=True)
        return step + 1, token, pos + 1, cache, out.at[:, step].set(token), done | (token == eos)

    step, *_, out, _ = jax.lax.while_loop(cond, body, state)
    return out, step


class Generator:
    """Compiled generation for one model on its mesh; thread-safe (calls are serialized)."""

    def __init__(self, cfg: Config, params: Params, mesh: jax.sharding.Mesh, eos_id: int | None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.eos_id = -1 if eos_id is None else eos_id
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._sink: TokenSink | None = None

    def _stream(self, step: np.ndarray, token: np.ndarray) -> None:
        if self._sink is not None:
            self._sink(int(step), np.asarray(token))

    def _fn(self, new_slots: int, streaming: bool, greedy: bool) -> Any:
        key = (new_slots, streaming, greedy)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(
                _generate, cfg=self.cfg, new_slots=new_slots, sink=self._stream if streaming else None, greedy=greedy))
        return self._compiled[key]

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                        temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                        top_p: float | Sequence[float] = 1.0, seed: int | Sequence[int] = 0,
                        on_tokens: TokenSink | None = None) -> list[list[int]]:
        """New tokens per prompt (ending at EOS, included, or after max_new_tokens)."""
        n = len(prompts)
        if n == 0:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if longest + max_new_tokens > self.cfg.seq:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"context of {self.cfg.seq} tokens")
        B, P, N = bucket(n, 1), bucket(longest), bucket(max_new_tokens)
        tokens = np.full((B, P), max(self.eos_id, 0), np.int32)
        valid = np.zeros((B, P), bool)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = p
            valid[i, P - len(p):] = True
        valid[n:, -1] = True  # filler rows: one real token each

        def per_row(value: Any, dtype: Any) -> np.ndarray:
            arr = np.broadcast_to(np.asarray(value, dtype), (n,)) if np.ndim(value) == 0 else np.asarray(value, dtype)
            if arr.shape != (n,):
                raise ValueError(f"per-prompt sampling parameters need {n} values, got {arr.shape[0]}")
            return np.concatenate([arr, np.repeat(arr[:1], B - n)])

        temps = per_row(temperature, np.float32)
        if (temps < 0).any():
            raise ValueError("temperature must be >= 0")
        args = (jnp.asarray(tokens), jnp.asarray(valid), jnp.int32(max_new_tokens), jnp.asarray(temps),
                jnp.asarray(per_row(top_k, np.int32)), jnp.asarray(per_row(top_p, np.float32)),
                jnp.asarray(per_row(seed, np.uint32)), jnp.int32(self.eos_id))
        with self._lock, jax.set_mesh(self.mesh):
            self._sink = (lambda step, tok: on_tokens(step, tok[:n])) if on_tokens else None
            try:
                out, steps = self._fn(N, on_tokens is not None, not (temps > 0).any())(self.params, *args)
                out, steps = np.asarray(out), int(steps)
            finally:
                self._sink = None
        results = []
        for row in out[:n, :steps].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            results.append(row[:max_new_tokens])
        return results
