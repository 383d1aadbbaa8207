"""KV-cache generation: one compiled prefill + `lax.while_loop` decode per (batch, prompt, length) bucket.

Prompts are left-padded, so every row's last prompt token sits in the same
slot and one decode step serves the whole batch; positions count real tokens
only and padded key slots are masked. Sampling parameters are per row.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from mtj import cpu_decode
from mtj.config import Config
from mtj.model import Params, logits_of, run_layers, unstack_layers
from mtj.sharding import constrain

# (step, new token per row) -> None, or a bool per row: True ends that row (a stop string, a client gone)
TokenSink = Callable[[int, np.ndarray], "np.ndarray | None"]
UNROLL_LAYERS = 16  # decode loops of models up to this depth are unrolled over layers
SEED_LIMIT = 2**32  # seeds are threefry keys' 32-bit words


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


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`): few shapes, few compilations."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


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


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """One token per row; temperature 0 is greedy. (All-greedy batches never get here:
    the generator compiles them without sampling.)"""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = filter_logits(scaled, top_k, top_p)
    # the Gumbel-max trick, as jax.random.categorical does it
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[1:]))(keys)
    return jnp.where(temperature > 0, argmax(scaled + gumbel), argmax(logits))


class Decoding(NamedTuple):
    """The decode loop's state."""
    step: jax.Array  # the next step's index
    token: jax.Array  # [B] the last token taken
    pos: jax.Array  # [B] its position
    cache: Any
    out: jax.Array  # [B, new_slots] tokens so far
    done: jax.Array  # [B] rows past EOS
    x: jax.Array  # [B, d_model] the step's final hidden state
    retry: jax.Array  # the screen could not decide the step: the full head must


def cache_lengths(prompt_slots: int, new_slots: int) -> list[int]:
    """The KV cache's length in each decode phase. Attention reads the whole cache
    every step, so long generations start with a short one and grow it (one copy
    per phase) instead of reading empty slots: 4 phases cut the reads by ~30%."""
    if new_slots < 64:  # not worth compiling the loop more than once
        return [prompt_slots + new_slots]
    return [prompt_slots + new_slots // 4 * (j + 1) for j in range(4)]


def _generate(params: Params, head: Params | None, tokens: jax.Array, valid: jax.Array, max_new: jax.Array,
              temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seeds: jax.Array, eos: jax.Array, *,
              cfg: Config, new_slots: int, sink: Callable | None, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """New tokens [B, new_slots] and how many steps ran. `head`: a `screen_head`
    for greedy batches (None: the full fp32 head decides)."""
    B, P = tokens.shape
    lengths = cache_lengths(P, new_slots)

    def zeros(*layers: int) -> jax.Array:
        shape = (*layers, B, cfg.n_heads, lengths[0], cfg.head_dim)
        return constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), *[None] * len(layers), "batch", "heads", None, None)

    if cfg.layers <= UNROLL_LAYERS or 0 in params["layers"]:  # per-layer caches: fastest decoding
        cache = [(zeros(), zeros()) for _ in range(cfg.layers)]
        params = unstack_layers(params, cfg)  # (no-op for weights given per layer, as a SlotEngine's)
    else:  # deep models: scanned layers over a stacked cache keep compile time flat
        cache = (zeros(cfg.layers), zeros(cfg.layers))
    key_valid = jnp.concatenate([valid, jnp.ones((B, new_slots), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    keys = jax.vmap(jax.random.key)(seeds)

    def pick(x: jax.Array, step: jax.Array) -> jax.Array:
        logits = logits_of(params, x, cfg)
        if greedy:  # known on the host: no branch, and the head's bias add fuses into the argmax
            return argmax(logits)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        return sample(logits, step_keys, temperature, top_k, top_p)

    def commit(state: Decoding, token: jax.Array, taken: jax.Array | bool = True) -> Decoding:
        """The state after this step's token where `taken` (else unchanged, to be retried)."""
        token, taken = jnp.where(state.done, eos, token), jnp.asarray(taken, bool)
        ended = token == eos
        if sink is not None:  # the host sees the token and may end rows
            ended |= io_callback(sink, jax.ShapeDtypeStruct((B,), jnp.bool_), state.step, token, taken, ordered=True)
        keep = lambda new, old: jnp.where(taken, new, old)  # noqa: E731
        return state._replace(step=keep(state.step + 1, state.step), token=keep(token, state.token),
                              pos=keep(state.pos + 1, state.pos),
                              out=state.out.at[:, state.step].set(keep(token, state.out[:, state.step])),
                              done=keep(state.done | ended, state.done))

    def take(state: Decoding) -> Decoding:
        """The state after the token of state.x, or, where the screen cannot decide it, marked to retry."""
        if head is None:
            return commit(state, pick(state.x, state.step))
        token, decided = cpu_decode.screened_argmax(state.x, head)
        return commit(state, token, decided)._replace(retry=~decided)

    x, cache = run_layers(params, tokens, cfg, positions, key_valid[:, :lengths[0]], cache, 0)  # prefill
    state = take(Decoding(jnp.int32(0), tokens[:, -1], positions[:, -1], cache, jnp.zeros((B, new_slots), jnp.int32),
                          jnp.zeros(B, bool), x[:, -1], jnp.bool_(False)))

    def decode_phase(state: Decoding, length: int) -> Decoding:
        """Decode steps while a cache of `length` slots holds them (grown to that first)."""
        def grow(a: jax.Array) -> jax.Array:  # [..., slots, head_dim]
            return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, length - a.shape[-2]), (0, 0)])

        state = state._replace(cache=jax.tree.map(grow, state.cache))
        phase_valid = key_valid[:, :length]

        def running(state: Decoding) -> jax.Array:
            # step t writes its key/value at slot P + t - 1
            return (state.step < max_new) & (state.step <= length - P) & ~jnp.all(state.done)

        def decode(state: Decoding) -> Decoding:
            x, cache = run_layers(params, state.token[:, None], cfg, state.pos[:, None], phase_valid, state.cache,
                                  P + state.step - 1)
            return take(state._replace(cache=cache, x=x[:, 0]))

        if head is None:
            return jax.lax.while_loop(running, decode, state)

        # XLA:CPU runs a while loop with a conditional in it ~2 ms a step slower, so an
        # undecided screen ends the screened loop instead, and the full head decides
        # that step (from its kept hidden state and cache) in an enclosing loop that
        # runs only then (the first screened loop is outside it: no full head per phase).
        def screened(state: Decoding) -> Decoding:
            return jax.lax.while_loop(lambda s: running(s) & ~s.retry, decode, state)

        def resume(state: Decoding) -> Decoding:  # the full head takes the step the screen could not decide
            full = argmax(logits_of(params, state.x, cfg))
            return screened(commit(state, full)._replace(retry=jnp.bool_(False)))

        return jax.lax.while_loop(lambda s: s.retry, resume, screened(state))

    for length in lengths:
        state = decode_phase(state, length)
    return state.out, state.step


class Generator:
    """Compiled generation for one model on its mesh; thread-safe (calls are serialized)."""

    def __init__(self, cfg: Config, params: Params, mesh: jax.sharding.Mesh, eos_id: int | None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.eos_id = -1 if eos_id is None else eos_id
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._sink: TokenSink | None = None
        self._rows = 0  # real (not filler) rows of the batch being decoded
        self._screen_head: Params | None = None

    def set_params(self, params: Params) -> None:
        """New weights of the same model (stacked or per layer); what is compiled stays."""
        with self._lock:
            self.params, self._screen_head = params, None

    def _stream(self, step: np.ndarray, token: np.ndarray, taken: np.ndarray) -> np.ndarray:
        ended = np.zeros(token.shape, bool)
        if self._sink is not None and taken:
            ended[self._rows:] = True  # filler rows: nobody waits for them
            rows = self._sink(int(step), np.asarray(token)[: self._rows])
            if rows is not None:
                ended[: self._rows] = rows
        return ended

    def _head(self, greedy: bool) -> Params | None:
        if not (greedy and cpu_decode.screens(self.cfg, self.mesh)):
            return None
        if self._screen_head is None:
            self._screen_head = jax.jit(functools.partial(cpu_decode.screen_head, cfg=self.cfg))(self.params)
        return self._screen_head

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

        rows = {}  # each sampling parameter per prompt, checked before any cast could wrap it
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
            rows[name] = list(value) if np.ndim(value) else [value] * n
            if len(rows[name]) != n:
                raise ValueError(f"per-prompt sampling parameters need {n} values, got {len(rows[name])} for {name}")
        for t, k, p, s in zip(rows["temperature"], rows["top_k"], rows["top_p"], rows["seed"]):
            check_sampling(float(t), int(k), float(p), int(s), self.cfg.n_vocab)

        def per_row(name: str, dtype: Any) -> np.ndarray:
            arr = np.asarray(rows[name], dtype)
            return np.concatenate([arr, np.repeat(arr[:1], B - n)])

        temps = per_row("temperature", np.float32)
        args = (jnp.asarray(tokens), jnp.asarray(valid), jnp.int32(max_new_tokens), jnp.asarray(temps),
                jnp.asarray(per_row("top_k", np.int32)), jnp.asarray(per_row("top_p", np.float32)),
                jnp.asarray(per_row("seed", np.uint32)), jnp.int32(self.eos_id))
        with self._lock, jax.set_mesh(self.mesh):
            self._sink, self._rows = on_tokens, n
            try:
                greedy = not (temps > 0).any()
                fn = self._fn(N, on_tokens is not None, greedy)
                out, steps = fn(self.params, self._head(greedy), *args)
                out, steps = np.asarray(out), int(steps)
            finally:
                self._sink = None
        results = []
        for row in out[:n, :steps].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            results.append(row[:max_new_tokens])
        return results
