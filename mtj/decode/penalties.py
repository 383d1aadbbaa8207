"""The logit adjustments a request may ask for, applied before temperature and top-k/top-p, in transformers'
order:

- `logit_bias` (OpenAI): a value added to chosen tokens' logits (transformers' SequenceBiasLogitsProcessor with
  one-token sequences);
- `repetition_penalty` (CTRL's, transformers' RepetitionPenaltyLogitsProcessor): the logit of a token already in
  the prompt or the output is divided by it where positive, multiplied where negative (1: off);
- `presence_penalty` and `frequency_penalty` (OpenAI's definition): subtracted once from the logit of a token the
  output holds, and once per time it holds it (0: off). Only generated tokens count, as in vLLM.

A row's `Seen` is what the penalties read: how often it generated each token, and which tokens its prompt holds;
the continuous engine keeps each slot's bias and `Seen` on the devices (`Rows`). Arrays are as wide as the logits
(the padded vocabulary: sampling draws the same noise with and without adjustments).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_BIAS = 100.0  # OpenAI's range for a logit_bias value, and for the penalties below
MAX_PENALTY = 2.0


class Penalties(NamedTuple):
    """Per-row values (device arrays inside the decode loops)."""
    bias: jax.Array  # [B, V] added to the logits
    repetition: jax.Array  # [B]
    presence: jax.Array  # [B]
    frequency: jax.Array  # [B]


class Seen(NamedTuple):
    counts: jax.Array  # [B, V] int32: times the row generated each token
    prompt: jax.Array  # [B, V] bool: tokens its prompt holds


def check_penalties(repetition: float, presence: float, frequency: float, bias: dict[int, float], n_vocab: int) -> None:
    """Raise ValueError naming the value (the one check, shared by the Python API, mtj-sample and the server)."""
    if not (math.isfinite(repetition) and repetition > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition}")
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -MAX_PENALTY <= value <= MAX_PENALTY:  # (nan fails too)
            raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 = off), got {value}")
    for token, value in bias.items():
        if not 0 <= token < n_vocab:
            raise ValueError(f"logit_bias names token {token}, outside the vocabulary [0, {n_vocab})")
        if not -MAX_BIAS <= value <= MAX_BIAS:
            raise ValueError(f"logit_bias values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {value} for token {token}")


def bias_row(bias: dict[int, float] | None, width: int) -> np.ndarray:
    """A row's logit_bias as [width] float32."""
    row = np.zeros(width, np.float32)
    for token, value in (bias or {}).items():
        row[token] = value
    return row


def neutral(repetition: float, presence: float, frequency: float, bias: dict[int, float] | None) -> bool:
    return repetition == 1 and presence == 0 and frequency == 0 and not any((bias or {}).values())


def seen_prompt(tokens: jax.Array, valid: jax.Array, width: int) -> Seen:
    """The state of rows whose prompts are tokens [B, P] (where `valid`) and that generated nothing yet."""
    B = tokens.shape[0]
    prompt = jnp.zeros((B, width), bool).at[jnp.arange(B)[:, None], tokens].max(valid)
    return Seen(jnp.zeros((B, width), jnp.int32), prompt)


def add(seen: Seen, tokens: jax.Array, taken: jax.Array | bool = True) -> Seen:
    """The state after each row generated tokens [B] (where `taken`)."""
    taken = jnp.broadcast_to(jnp.asarray(taken, jnp.int32), tokens.shape)
    return seen._replace(counts=seen.counts.at[jnp.arange(tokens.shape[0]), tokens].add(taken))


def apply(logits: jax.Array, penalties: Penalties, seen: Seen) -> jax.Array:
    """logits [B, V] adjusted (float32)."""
    logits = logits.astype(jnp.float32) + penalties.bias
    r = penalties.repetition[:, None]
    generated = seen.counts > 0
    logits = jnp.where(seen.prompt | generated, jnp.where(logits < 0, logits * r, logits / r), logits)
    return logits - penalties.frequency[:, None] * seen.counts - penalties.presence[:, None] * generated


def apply_along(logits: jax.Array, penalties: Penalties, seen: Seen, drafts: jax.Array) -> jax.Array:
    """logits [B, T, V] of a speculative step (a row's last token, then its T - 1 drafts [B, T - 1]) adjusted, each
    position as if the drafts before it had been generated."""
    B, T, V = logits.shape
    before = jnp.cumsum(jax.nn.one_hot(drafts, V, dtype=jnp.int32), axis=1)  # [B, T - 1, V]
    counts = seen.counts[:, None] + jnp.pad(before, ((0, 0), (1, 0), (0, 0)))
    per_position = lambda a: jnp.repeat(a, T, axis=0)  # noqa: E731
    flat = Seen(counts.reshape(B * T, V), per_position(seen.prompt))
    return apply(logits.reshape(B * T, V), Penalties(*map(per_position, penalties)), flat).reshape(B, T, V)


class Rows(NamedTuple):
    """The continuous engine's adjustments on the devices: each slot's logit_bias [S, V] and `Seen`."""
    bias: jax.Array
    seen: Seen


def empty_rows(slots: int, width: int) -> Rows:
    return Rows(jnp.zeros((slots, width), jnp.float32), Seen(jnp.zeros((slots, width), jnp.int32),
                                                             jnp.zeros((slots, width), bool)))


def start_row(rows: Rows, slot: jax.Array, bias: jax.Array, tokens: jax.Array, valid: jax.Array) -> Rows:
    """`rows` with the slot's bias [V] and the state of its prompt tokens [1, P] (where valid)."""
    prompt = seen_prompt(tokens, valid, rows.bias.shape[1]).prompt[0]
    return Rows(rows.bias.at[slot].set(bias), Seen(rows.seen.counts.at[slot].set(0), rows.seen.prompt.at[slot].set(prompt)))


def of_rows(rows: Rows, values: jax.Array) -> Penalties:
    """The slots' penalties: their bias rows and `values` [S, 3] (repetition, presence, frequency)."""
    return Penalties(rows.bias, values[:, 0], values[:, 1], values[:, 2])
