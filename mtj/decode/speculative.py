"""Speculative decoding's pure parts: prompt-lookup drafts and the acceptance rules.

A draft is the k tokens that followed the most recent earlier occurrence of a row's last n tokens in its
own prompt and output (prompt lookup, n = 3, else 2: vLLM's "ngram" method). The model then reads the
row's last token and the draft in one step, k + 1 positions, and keeps the longest prefix of the draft it
agrees with, plus one token of its own. Greedy: a draft token is kept when it is the argmax, so the output
is plain greedy decoding's. Sampled: a drafted token d (proposed with certainty) is kept with probability
p(d) under the row's filtered, tempered distribution p, and at the first rejection the token is drawn from p
without d, renormalized: the standard rule (Leviathan et al. 2023) for a one-point proposal, so every token
follows p exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtj.decode.sampling import SamplingParams, argmax, filter_logits

NGRAMS = (3, 2)  # the n-gram lengths looked up, longest first


def lookup(history: jax.Array, length: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Per row of history [B, L] (its first `length` tokens real: a scalar, or one per row [B]): the k tokens after
    the most recent earlier occurrence of the row's last n tokens, [B, k], and whether one was found [B]."""
    B, L = history.shape
    length = jnp.broadcast_to(length, (B,))[:, None]
    drafts, found = jnp.zeros((B, k), history.dtype), jnp.zeros(B, bool)
    for n in NGRAMS:
        tail = jnp.take_along_axis(history, jnp.maximum(length - n + jnp.arange(n), 0), axis=1)  # [B, n]
        starts = jnp.arange(L - n + 1)
        match = (starts[None, :] + n < length) & (length >= n)  # an earlier occurrence, followed by a token
        for o in range(n):
            match &= history[:, o:L - n + 1 + o] == tail[:, o:o + 1]
        last = jnp.max(jnp.where(match, starts, -1), axis=1)  # [B]
        after = jnp.clip(last[:, None] + n + jnp.arange(k), 0, L - 1)
        use = (last >= 0) & ~found
        drafts = jnp.where(use[:, None], jnp.take_along_axis(history, after, axis=1), drafts)
        found |= use
    return drafts, found


def accept_greedy(logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, k + 1, V] of the last token and k drafts: (tokens [B, k + 1], how many of them to take [B]):
    the argmax at each position, taken up to the first draft that differs from it and one past it."""
    B, T, V = logits.shape
    target = argmax(logits.reshape(B * T, V)).reshape(B, T)
    agreed = jnp.cumprod(drafts == target[:, :-1], axis=1).sum(axis=1)
    return target, agreed.astype(jnp.int32) + 1


def distribution(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
    """What each row samples from at each position of logits [B, T, V]: its tempered, top-k/top-p filtered
    logits (a temperature of 0 leaves them unscaled)."""
    B, T, V = logits.shape
    per_position = lambda a: jnp.repeat(a, T)  # noqa: E731
    temperature = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)
    scaled = logits.reshape(B * T, V) / per_position(temperature)[:, None]
    return filter_logits(scaled, per_position(sampling.top_k), per_position(sampling.top_p)).reshape(B, T, V)


def accept_sampled(logits: jax.Array, drafts: jax.Array, keys: jax.Array, sampling: SamplingParams,
                   draft_probs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """As `accept_greedy`, by the acceptance rule for rows with a temperature (keys [B]: this step's RNG keys;
    rows at temperature 0 as greedy). `draft_probs` [B, k, V]: the distributions a draft model drew the drafts
    from (q): a draft d is kept with probability min(1, p(d) / q(d)) and a rejected one replaced by a draw from
    max(0, p - q), renormalized; None: the drafts were proposed with certainty."""
    B, T, V = logits.shape
    temperature = sampling.temperature
    filtered = distribution(logits, sampling)
    probs = jax.nn.softmax(filtered, axis=-1)
    position_keys = jax.vmap(lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(T)))(keys)
    uniform = jax.vmap(jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0))))(position_keys)  # [B, T]
    gumbel = jax.vmap(jax.vmap(lambda key: jax.random.gumbel(jax.random.fold_in(key, 1), (V,))))(position_keys)
    ratio = jnp.take_along_axis(probs[:, :-1], drafts[..., None], axis=-1)[..., 0]  # p(d) [B, k]
    if draft_probs is None:
        drafted = jax.nn.one_hot(jnp.pad(drafts, ((0, 0), (0, 1)), constant_values=-1), V, dtype=bool)  # none at k
        residual = jnp.where(drafted, -jnp.inf, filtered)  # p without the rejected draft (a kept one is never drawn)
    else:
        ratio = ratio / jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        residual = jnp.log(jnp.maximum(probs - jnp.pad(draft_probs, ((0, 0), (0, 1), (0, 0))), 0.0))  # at k: p
    agreed = jnp.cumprod(uniform[:, :-1] < ratio, axis=1).sum(axis=1).astype(jnp.int32)
    drawn = argmax((residual + gumbel).reshape(B * T, V)).reshape(B, T)
    positions = jnp.arange(T)[None, :]
    tokens = jnp.where(positions < agreed[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), drawn)
    greedy_tokens, greedy_count = accept_greedy(logits, drafts)
    sampled = (temperature > 0)[:, None]
    return jnp.where(sampled, tokens, greedy_tokens), jnp.where(sampled[:, 0], agreed + 1, greedy_count)
