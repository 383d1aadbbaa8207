"""KV-cache generation: one compiled prefill + `lax.while_loop` decode per (batch, prompt, length) bucket.

Prompts are left-padded, so every row's last prompt token sits in the same
slot and one decode step serves the whole batch; positions count real tokens
only and padded key slots are masked. Sampling parameters are per row.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from mtj import platforms
from mtj.config import Config
from mtj.decode import cpu as cpu_decode
from mtj.decode import penalties, speculative
from mtj.decode.cache import empty_cache
from mtj.decode.draft import DraftModel
from mtj.decode.sampling import SamplingParams, argmax, check_sampling, sample
from mtj.model import Layout, Params, logits_of, run_layers, unstack_layers

# (step, new token per row) -> None, or a bool per row: True ends that row (a stop string, a client gone)
TokenSink = Callable[[int, np.ndarray], "np.ndarray | None"]


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`): few shapes, few compilations."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


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
    # speculative decoding (mtj.decode.speculative; unused without it)
    drafts: jax.Array  # [B, k] the prompt-lookup draft of the next step
    speculate: jax.Array  # a row has a draft and no back-off is pending: the next step verifies the drafts
    misses: jax.Array  # speculative steps in a row that kept no draft token
    wait: jax.Array  # plain steps before drafts are tried again (2^misses - 1 after a miss)
    drafted: jax.Array  # draft tokens verified so far (per step, not per row)
    accepted: jax.Array  # ... of which kept
    draft_cache: Any = None  # a draft model's KV cache (with one)
    seen: penalties.Seen | None = None  # what the penalties read (with any)


def cache_lengths(prompt_slots: int, new_slots: int, phases: int) -> list[int]:
    """The KV cache's length in each of `phases` decode phases. Attention reads the whole cache
    every step, so long generations start with a short one and grow it (one copy
    per phase) instead of reading empty slots: 4 phases cut the reads by ~30%."""
    if new_slots < 64:  # not worth compiling the loop more than once
        return [prompt_slots + new_slots]
    return [prompt_slots + new_slots * (j + 1) // phases for j in range(phases)]


@dataclasses.dataclass
class _BatchLoop:
    """One batch's decode steps, traced into `_generate`'s program: each step's token (sampled, greedy, or
    screened on CPU) and the decode phases of a growing cache."""
    params: Params
    head: Params | None  # a `screen_head` for greedy batches (None: the full fp32 head decides)
    cfg: Config
    key_valid: jax.Array  # [B, P + new_slots] which key slots hold tokens (the prompts' left padding does not)
    max_new: jax.Array
    sampling: SamplingParams
    keys: jax.Array  # [B] RNG keys
    eos: jax.Array
    sink: Callable | None
    greedy: bool
    prompt: jax.Array  # [B, P] (left-padded): with the output, what drafts are looked up in
    draft_len: int  # draft tokens a speculative step verifies (0: no speculation)
    draft: DraftModel | None = None  # where drafts come from (None: prompt lookup)
    adjust: penalties.Penalties | None = None  # logit_bias and penalties (None: none)

    def pick(self, x: jax.Array, step: jax.Array, seen: penalties.Seen | None) -> jax.Array:
        logits = logits_of(self.params, x, self.cfg)
        if self.adjust is not None:
            logits = penalties.apply(logits, self.adjust, seen)
        if self.greedy:  # known on the host: no branch, and the head's bias add fuses into the argmax
            return argmax(logits)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(self.keys, step)
        return sample(logits, step_keys, self.sampling)

    def commit(self, state: Decoding, token: jax.Array, taken: jax.Array | bool = True) -> Decoding:
        """The state after this step's token where `taken` (else unchanged, to be retried)."""
        token, taken = jnp.where(state.done, self.eos, token), jnp.asarray(taken, bool)
        ended = token == self.eos
        if self.sink is not None:  # the host sees the token and may end rows
            ended |= io_callback(self.sink, jax.ShapeDtypeStruct(token.shape, jnp.bool_), state.step, token, taken,
                                 ordered=True)
        keep = lambda new, old: jnp.where(taken, new, old)  # noqa: E731
        if state.seen is not None:
            state = state._replace(seen=penalties.add(state.seen, token, taken))
        return state._replace(step=keep(state.step + 1, state.step), token=keep(token, state.token),
                              pos=keep(state.pos + 1, state.pos),
                              out=state.out.at[:, state.step].set(keep(token, state.out[:, state.step])),
                              done=keep(state.done | ended, state.done))

    def take(self, state: Decoding) -> Decoding:
        """The state after the token of state.x, or, where the screen cannot decide it, marked to retry."""
        if self.draft_len:  # (plain decoding's program stays as it was)
            state = state._replace(wait=jnp.maximum(state.wait - 1, 0))
        if self.head is None:
            return self.plan(self.commit(state, self.pick(state.x, state.step, state.seen)))
        token, decided = cpu_decode.screened_argmax(state.x, self.head)
        return self.plan(self.commit(state, token, decided)._replace(retry=~decided))

    def plan(self, state: Decoding) -> Decoding:
        """Look up the next step's drafts (speculative decoding only)."""
        if not self.draft_len or self.draft is not None:  # (a draft model drafts at every step)
            return state._replace(speculate=jnp.bool_(self.draft is not None))
        history = jnp.concatenate([self.prompt, state.out], axis=1)
        drafts, found = speculative.lookup(history, self.prompt.shape[1] + state.step, self.draft_len)
        return state._replace(drafts=drafts, speculate=jnp.any(found & ~state.done) & (state.wait == 0))

    def verify(self, state: Decoding, key_valid: jax.Array, P: int) -> Decoding:
        """One speculative step: the last token and the drafts in one pass; every row takes as many tokens as
        the row that agreed least (rows stay aligned), at least one. A step that keeps no draft token backs off
        (2^misses - 1 plain steps before drafts are tried again)."""
        K, slot = self.draft_len, P + state.step - 1
        step_keys = None if self.greedy else jax.vmap(jax.random.fold_in, in_axes=(0, None))(self.keys, state.step)
        q = None
        if self.draft is not None:
            previous = jnp.concatenate([self.prompt, state.out], axis=1)[:, slot - 1]
            drafts, q, draft_cache = self.draft.propose(state.draft_cache, previous, state.token, slot, K, step_keys,
                                                        self.sampling)
            state = state._replace(drafts=drafts, draft_cache=draft_cache)
        tokens = jnp.concatenate([state.token[:, None], state.drafts], axis=1)
        x, cache = run_layers(self.params, tokens, self.cfg, state.pos[:, None] + jnp.arange(K + 1), key_valid,
                              state.cache, slot)
        logits = logits_of(self.params, x, self.cfg)
        if self.adjust is not None:
            logits = penalties.apply_along(logits, self.adjust, state.seen, state.drafts)
        logits = logits[..., :self.cfg.n_vocab]  # (a draft model's q spans the vocabulary only)
        if self.greedy:
            emitted, count = speculative.accept_greedy(logits, state.drafts)
        else:
            emitted, count = speculative.accept_sampled(logits, state.drafts, step_keys, self.sampling, q)
        m = jnp.minimum(jnp.min(jnp.where(state.done, K + 1, count)), self.max_new - state.step)
        state = jax.lax.fori_loop(0, m, lambda i, s: self.commit(s, emitted[:, i]), state._replace(cache=cache))
        misses = jnp.where((m > 1) | (self.draft is not None), 0, jnp.minimum(state.misses + 1, 6))  # (see plan)
        return self.plan(state._replace(misses=misses, wait=jnp.left_shift(1, misses) - 1,
                                        drafted=state.drafted + K, accepted=state.accepted + m - 1))

    def phase(self, state: Decoding, length: int, P: int) -> Decoding:
        """Decode steps while a cache of `length` slots holds them (grown to that first)."""
        def grow(a: jax.Array) -> jax.Array:  # [..., slots, head_dim]
            return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, length - a.shape[-2]), (0, 0)])

        state = state._replace(cache=jax.tree.map(grow, state.cache))
        phase_valid = self.key_valid[:, :length]

        def running(state: Decoding) -> jax.Array:
            # step t writes its key/value at slot P + t - 1
            return (state.step < self.max_new) & (state.step <= length - P) & ~jnp.all(state.done)

        def speculating(state: Decoding) -> jax.Array:  # (a speculative step writes k more slots; `steps` returns
            # with no screened step undecided)
            return running(state) & state.speculate & (state.step + self.draft_len <= length - P)

        plain = (lambda s: running(s) & ~speculating(s)) if self.draft_len else running

        def decode(state: Decoding) -> Decoding:
            x, cache = run_layers(self.params, state.token[:, None], self.cfg, state.pos[:, None], phase_valid,
                                  state.cache, P + state.step - 1)
            return self.take(state._replace(cache=cache, x=x[:, 0]))

        def full_head(state: Decoding) -> Decoding:  # takes the step the screen could not decide
            full = argmax(logits_of(self.params, state.x, self.cfg))
            return self.plan(self.commit(state, full)._replace(retry=jnp.bool_(False)))

        def steps(state: Decoding) -> Decoding:  # plain steps (a conditional in the loop would slow each one)
            if self.head is None:
                return jax.lax.while_loop(plain, decode, state)
            return cpu_decode.screened_loop(plain, decode, full_head, state)

        if not self.draft_len:
            return steps(state)
        return jax.lax.while_loop(speculating, lambda s: steps(self.verify(s, phase_valid, P)), steps(state))


def _decode_weights(params: Params, cfg: Config, batch: int, length: int) -> tuple[Params, Any]:
    """The weights as a decode loop reads them and their empty KV cache: per-layer caches (fastest decoding), or,
    for deep models given stacked, scanned layers over one stacked cache (compile time stays flat)."""
    if cfg.layers <= platforms.platform().unroll_layers or not Layout.of(params).stacked:
        return unstack_layers(params, cfg), empty_cache(cfg, batch, length)  # (no-op for per-layer weights)
    return params, empty_cache(cfg, batch, length, stacked=True)


def _generate(params: Params, head: Params | None, tokens: jax.Array, valid: jax.Array, max_new: jax.Array,
              sampling: SamplingParams, seeds: jax.Array, eos: jax.Array, draft: Params | None = None,
              adjust: penalties.Penalties | None = None, *, cfg: Config, new_slots: int, sink: Callable | None,
              greedy: bool, draft_len: int = 0, draft_cfg: Config | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """New tokens [B, new_slots], how many steps ran, and [draft tokens verified, kept]. `head`: a `screen_head`
    for greedy batches (None: the full fp32 head decides); `draft_len`: speculative decoding's drafts, from
    `draft` (a draft model's weights, of `draft_cfg`) or prompt lookup; `adjust`: logit_bias and penalties."""
    B, P = tokens.shape
    # a draft model's cache follows the target's slots: one phase, no growing
    lengths = [P + new_slots] if draft is not None else cache_lengths(P, new_slots, platforms.platform().cache_phases)
    params, cache = _decode_weights(params, cfg, B, lengths[0])
    key_valid = jnp.concatenate([valid, jnp.ones((B, new_slots), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    drafter, draft_cache = None, None
    if draft is not None:
        draft, draft_cache = _decode_weights(draft, draft_cfg, B, P + new_slots)
        slot_positions = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(new_slots)], axis=1)
        drafter = DraftModel(draft, draft_cfg, key_valid, slot_positions)
        draft_cache = drafter.prefill(tokens, draft_cache)
    loop = _BatchLoop(params, head, cfg, key_valid, max_new, sampling, jax.vmap(jax.random.key)(seeds), eos, sink,
                      greedy, tokens, draft_len, drafter, adjust)
    x, cache = run_layers(params, tokens, cfg, positions, key_valid[:, :lengths[0]], cache, 0)  # prefill
    state = loop.take(Decoding(jnp.int32(0), tokens[:, -1], positions[:, -1], cache,
                               jnp.zeros((B, new_slots), jnp.int32), jnp.zeros(B, bool), x[:, -1], jnp.bool_(False),
                               jnp.zeros((B, draft_len), jnp.int32), jnp.bool_(False), *[jnp.int32(0)] * 4,
                               draft_cache, None if adjust is None else penalties.seen_prompt(tokens, valid, cfg.padded_vocab)))
    for length in lengths:
        state = loop.phase(state, length, P)
    return state.out, state.step, jnp.stack([state.drafted, state.accepted])


def row_values(n: int, B: int, cfg: Config, **values: Any) -> tuple[SamplingParams, jax.Array, penalties.Penalties | None]:
    """Each of `values` (temperature, top_k, top_p, seed, repetition, presence, frequency, bias: one for every prompt
    or one per prompt) over a batch of B rows (filler rows copy the first), checked before any cast could wrap it:
    the sampling values, the seeds, and the logit adjustments (None where every row's are neutral)."""
    rows, n_vocab = {}, cfg.n_vocab
    for name, value in values.items():
        rows[name] = list(value) if np.ndim(value) or isinstance(value, (list, tuple)) else [value] * n
        if len(rows[name]) != n:
            raise ValueError(f"per-prompt sampling parameters need {n} values, got {len(rows[name])} for {name}")
    for t, k, p, s in zip(rows["temperature"], rows["top_k"], rows["top_p"], rows["seed"]):
        check_sampling(float(t), int(k), float(p), int(s), n_vocab)
    adjustments = list(zip(*(rows[k] for k in ("repetition", "presence", "frequency", "bias"))))
    for r, p, f, b in adjustments:
        penalties.check_penalties(float(r), float(p), float(f), b or {}, n_vocab)

    def per_row(name: str, dtype: Any) -> jax.Array:
        arr = np.asarray(rows[name], dtype)
        return jnp.asarray(np.concatenate([arr, np.repeat(arr[:1], B - n, axis=0)]))

    sampling = SamplingParams(per_row("temperature", np.float32), per_row("top_k", np.int32), per_row("top_p", np.float32))
    adjust = None
    if not all(penalties.neutral(*a) for a in adjustments):
        rows["bias"] = [penalties.bias_row(b, cfg.padded_vocab) for b in rows["bias"]]
        adjust = penalties.Penalties(*(per_row(k, np.float32) for k in ("bias", "repetition", "presence", "frequency")))
    return sampling, per_row("seed", np.uint32), adjust


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
        self.drafts = np.zeros(2, np.int64)  # speculative decoding so far: draft tokens verified, kept
        self.draft: tuple[Config, Params] | None = None  # a draft model for speculative decoding (set_draft)

    def set_draft(self, cfg: Config | None, params: Params | None) -> None:
        """Draft speculative decoding's tokens with this model (of the same vocabulary); None: prompt lookup."""
        with self._lock:
            self.draft = None if cfg is None else (cfg, params)
            self._compiled = {key: fn for key, fn in self._compiled.items() if not key[-1]}  # (compiled with a draft)

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

    @staticmethod
    def abstract_args(batch: int, prompt: int) -> tuple:
        """The shapes of a compiled call's arguments past the weights and the head, as `generate_tokens` passes
        them (tokens, valid, max_new, sampling, seeds, eos), for ahead-of-time compiles (compile_check)."""
        sds = jax.ShapeDtypeStruct
        return (sds((batch, prompt), jnp.int32), sds((batch, prompt), bool), sds((), jnp.int32),
                SamplingParams(sds((batch,), jnp.float32), sds((batch,), jnp.int32), sds((batch,), jnp.float32)),
                sds((batch,), jnp.uint32), sds((), jnp.int32))

    def _head(self, greedy: bool) -> Params | None:
        if not (greedy and cpu_decode.screens(self.cfg, self.mesh)):
            return None
        if self._screen_head is None:
            self._screen_head = jax.jit(functools.partial(cpu_decode.screen_head, cfg=self.cfg))(self.params)
        return self._screen_head

    def _fn(self, new_slots: int, streaming: bool, greedy: bool, speculate: int = 0, adjusted: bool = False) -> Any:
        """The compiled `_generate` (`adjusted`: called with logit_bias and penalties)."""
        draft_cfg = self.draft[0] if speculate and self.draft else None
        key = (new_slots, streaming, greedy, speculate, adjusted, draft_cfg is not None)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(
                _generate, cfg=self.cfg, new_slots=new_slots, sink=self._stream if streaming else None, greedy=greedy,
                draft_len=speculate, draft_cfg=draft_cfg))
        return self._compiled[key]

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                        temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                        top_p: float | Sequence[float] = 1.0, seed: int | Sequence[int] = 0,
                        on_tokens: TokenSink | None = None, speculate: int = 0, *,
                        repetition_penalty: float | Sequence[float] = 1.0, presence_penalty: float | Sequence[float] = 0.0,
                        frequency_penalty: float | Sequence[float] = 0.0,
                        logit_bias: dict[int, float] | Sequence[dict[int, float]] | None = None) -> list[list[int]]:
        """New tokens per prompt (ending at EOS, included, or after max_new_tokens). `speculate` k: prompt-lookup
        drafts of k tokens (`mtj.decode.speculative`: the same greedy output; sampled, the same distribution).
        Sampling values, penalties and logit_bias ({token: bias}; `mtj.decode.penalties`) are one for every prompt
        or one per prompt."""
        n = len(prompts)
        if not 0 <= speculate <= 16:
            raise ValueError(f"speculate must be in [0, 16] (draft tokens per step; 0 = off), got {speculate}")
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

        sampling, seeds, adjust = row_values(n, B, self.cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                             seed=seed, repetition=repetition_penalty, presence=presence_penalty,
                                             frequency=frequency_penalty, bias=logit_bias)
        args = (jnp.asarray(tokens), jnp.asarray(valid), jnp.int32(max_new_tokens), sampling, seeds,
                jnp.int32(self.eos_id))
        with self._lock, jax.set_mesh(self.mesh):
            self._sink, self._rows = on_tokens, n
            try:
                greedy = not (np.asarray(sampling.temperature) > 0).any()
                fn = self._fn(N, on_tokens is not None, greedy, speculate, adjust is not None)
                out, steps, drafts = fn(self.params, None if adjust is not None else self._head(greedy), *args,
                                        self.draft[1] if speculate and self.draft else None, adjust)
                out, steps = np.asarray(out), int(steps)
                self.drafts += np.asarray(drafts)
            finally:
                self._sink = None
        results = []
        for row in out[:n, :steps].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            results.append(row[:max_new_tokens])
        return results
