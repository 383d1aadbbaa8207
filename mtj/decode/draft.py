"""Draft tokens from a smaller model of the same vocabulary (speculative decoding's other drafter, beside
prompt lookup): GPT-Neo-125M for GPT-J-6B, a small Pythia for a large one. The draft model keeps a KV cache of
its own over the same slots as the target's; each speculative step it first reads the row's last two tokens
(the one before may be missing: a step that kept all k drafts never fed the last one), then draws k tokens one
at a time, greedy or from its own tempered, filtered distribution q (kept for the acceptance rule). `DraftModel`
drafts for generate_tokens' aligned rows, `propose_rows` for the continuous engine's slots."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mtj.decode import speculative
from mtj.decode.sampling import SamplingParams, argmax
from mtj.model import Params, logits_of, run_layers


@dataclasses.dataclass
class DraftModel:
    params: Params
    cfg: Any
    key_valid: jax.Array  # [B, L]: which of the cache's L slots hold tokens (the prompts' left padding does not)
    slot_positions: jax.Array  # [B, L]: the position of the token in each slot

    def prefill(self, tokens: jax.Array, cache: Any) -> Any:
        """The cache holding the prompts [B, P] (slots 0..P-1)."""
        P = tokens.shape[1]
        return run_layers(self.params, tokens, self.cfg, self.slot_positions[:, :P], self.key_valid, cache, 0)[1]

    def _read(self, tokens: jax.Array, slot: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """Logits over the vocabulary after tokens [B, T] written from `slot`, and the cache."""
        positions = jax.lax.dynamic_slice_in_dim(self.slot_positions, slot, tokens.shape[1], axis=1)
        x, cache = run_layers(self.params, tokens, self.cfg, positions, self.key_valid, cache, slot)
        return logits_of(self.params, x[:, -1], self.cfg)[:, :self.cfg.n_vocab], cache

    def propose(self, cache: Any, previous: jax.Array, token: jax.Array, slot: jax.Array, k: int,
                keys: jax.Array | None, sampling: SamplingParams) -> tuple[jax.Array, jax.Array | None, Any]:
        """`propose`, `token` in slot `slot` of every row."""
        return propose(lambda tokens, offset, cache: self._read(tokens, slot + offset, cache), cache, previous, token,
                       k, keys, sampling, self.cfg.n_vocab)


def check_draft(target: Any, draft: Any) -> None:
    """Raise ValueError unless a model of config `draft` can draft for one of config `target`."""
    if draft.n_vocab != target.n_vocab:
        raise ValueError(f"a draft model needs the target's vocabulary: {draft.n_vocab} tokens, not {target.n_vocab}")


def propose(read: Callable, cache: Any, previous: jax.Array, token: jax.Array, k: int, keys: jax.Array | None,
            sampling: SamplingParams, n_vocab: int) -> tuple[jax.Array, jax.Array | None, Any]:
    """k tokens [B, k] to follow `token` [B] (`previous` in the slot before it), the distributions they were drawn
    from [B, k, V] (None for greedy: keys None), and the cache. `read(tokens [B, T], offset, cache)`: the draft
    model's logits [B, V] after `tokens` written from `offset` slots past `token`'s, and the cache."""
    B, V = token.shape[0], n_vocab

    def draw(i: int | jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        if keys is None:
            return argmax(logits), jnp.zeros((B, V))
        filtered = speculative.distribution(logits[:, None], sampling)[:, 0]
        gumbel = jax.vmap(lambda key: jax.random.gumbel(jax.random.fold_in(key, 1000 + i), (V,)))(keys)
        drawn = jnp.where(sampling.temperature > 0, argmax(filtered + gumbel), argmax(logits))
        return drawn, jax.nn.softmax(filtered, axis=-1)

    logits, cache = read(jnp.stack([previous, token], axis=1), -1, cache)

    def step(i: jax.Array, carry: tuple) -> tuple:
        logits, cache, drafts, probs = carry
        drafted, q = draw(i, logits)
        logits, cache = read(drafted[:, None], 1 + i, cache)
        return logits, cache, drafts.at[:, i].set(drafted), probs.at[:, i].set(q)

    start = (logits, cache, jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k, V)))
    logits, cache, drafts, probs = jax.lax.fori_loop(0, k - 1, step, start)  # the last draft is not read
    drafted, q = draw(k - 1, logits)
    drafts, probs = drafts.at[:, k - 1].set(drafted), probs.at[:, k - 1].set(q)
    return drafts, None if keys is None else probs, cache


def propose_rows(params: Params, cfg: Any, cache: Any, history: jax.Array, lengths: jax.Array, k: int,
                 keys: jax.Array | None, sampling: SamplingParams, span: int) -> tuple[jax.Array, jax.Array | None, Any]:
    """`propose` for the continuous engine's slots, each at its own position: `history` [S, seq] holds each slot's
    tokens, its last at position `lengths` [S] (the slot of its draft-cache row), which it reads from its first
    `span` slots. A one-token prompt has no token before its last: that read goes to slot -1, which wraps to the
    row's last slot (a slot is always written before a query reads it) and masks every key."""
    rows = jnp.arange(lengths.shape[0])
    valid = jnp.arange(span)[None, :] <= (lengths + k)[:, None]

    def read(tokens: jax.Array, offset: int | jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        index = lengths + offset
        x, cache = run_layers(params, tokens, cfg, index[:, None] + jnp.arange(tokens.shape[1]), valid, cache, index)
        return logits_of(params, x[:, -1], cfg)[:, :cfg.n_vocab], cache

    return propose(read, cache, history[rows, jnp.maximum(lengths - 1, 0)], history[rows, lengths], k, keys, sampling,
                   cfg.n_vocab)
