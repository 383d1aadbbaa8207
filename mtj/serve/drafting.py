"""The continuous engine's draft model (`mtj-serve --speculate K --draft-ckpt CKPT`): a smaller model of the same
vocabulary whose k tokens per step each slot's speculative step verifies (`mtj.decode.draft.propose_rows`). It
holds its weights in their decode layout, a KV cache row per slot as long as the target's context, and prefills
every prompt into its slot's row (all of it: the prefix cache keeps the target's keys and values only)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mtj.decode import slots as slots_verbs
from mtj.decode.draft import check_draft
from mtj.lm import LM


class DraftSlots:
    def __init__(self, draft: LM, target: LM, slots: int):
        check_draft(target.config, draft.config)
        self.cfg = draft.config
        self.params = draft.use_decode_layout()
        with jax.set_mesh(target.mesh):
            self.cache = slots_verbs.init_cache(self.cfg, slots, target.config.seq)
        self._prefill = jax.jit(functools.partial(slots_verbs.prefill, cfg=self.cfg))
        self._insert = jax.jit(slots_verbs.insert, donate_argnums=0)

    def start(self, slot: int, tokens: Any) -> None:
        """The slot's row holds the prompt `tokens` [1, bucket] (right-padded, its last token left out)."""
        self.cache = self._insert(self.cache, self._prefill(self.params, tokens), jnp.int32(slot))

    def warm(self, buckets: list[int]) -> None:
        for size in buckets:
            self.start(0, jnp.zeros((1, size), jnp.int32))
