"""Log-likelihood scoring as lm-evaluation-harness asks for it (mtj.harness's `loglikelihood`).

Each (context, continuation) token pair is scored by one forward pass over
context+continuation: the summed log-probability of the continuation's tokens,
and whether greedy decoding would produce all of them.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mtj.config import Config
from mtj.decode.generator import bucket
from mtj.model import Params, forward


def _token_scores(params: Params, tokens: jax.Array, targets: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target token and whether it is the argmax; [B, T] each."""
    logp = jax.nn.log_softmax(forward(params, tokens, cfg), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


TOP_LOGPROBS = 20  # the most alternatives `top_scores` returns per position (OpenAI's limit for logprobs)


def top_scores(params: Params, tokens: jax.Array, targets: jax.Array, cfg: Config
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probability of each target token [B, T], and the TOP_LOGPROBS most likely tokens' log-probabilities
    and ids [B, T, TOP_LOGPROBS] (largest first; ties: the lower id first)."""
    logp = jax.nn.log_softmax(forward(params, tokens, cfg), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    values, ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
    return picked, values, ids


class Scorer:
    """Scores token pairs with one model config on one mesh; compiled once, given params per call
    (the training loop scores its current weights at every validation)."""

    def __init__(self, cfg: Config, mesh: Mesh, batch_size: int = 8):
        self.cfg, self.mesh, self.batch_size = cfg, mesh, batch_size
        # Replicated out: on several processes each can read the scores of the whole batch.
        self._score = jax.jit(functools.partial(_token_scores, cfg=cfg), out_shardings=NamedSharding(mesh, P()))

    def loglikelihoods(self, params: Params, pairs: Sequence[tuple[list[int], list[int]]],
                       progress: bool = True) -> Iterator[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, greedy match) per (context, continuation)
        pair. Contexts longer than the model's window lose their oldest tokens."""
        seq, B = self.cfg.seq, self.batch_size
        replicated = NamedSharding(self.mesh, P())  # every process holds the whole batch
        for start in tqdm(range(0, len(pairs), B), desc="scoring", unit="batch", disable=not progress):
            chunk = pairs[start:start + B]
            windows = []
            for ctx, cont in chunk:
                if not cont or len(cont) > seq:
                    raise ValueError(f"a continuation needs 1 to {seq} tokens, got {len(cont)}")
                windows.append((ctx + cont)[-(seq + 1):])
            width = min(bucket(max(len(w) for w in windows) - 1), seq)
            tokens = np.zeros((B, width), np.int32)  # right-padded: a causal model never sees the padding
            targets = np.zeros((B, width), np.int32)
            for i, w in enumerate(windows):
                tokens[i, : len(w) - 1], targets[i, : len(w) - 1] = w[:-1], w[1:]
            with jax.set_mesh(self.mesh):
                tokens, targets = (jax.make_array_from_process_local_data(replicated, a) for a in (tokens, targets))
                logp, greedy = (np.asarray(a) for a in self._score(params, tokens, targets))
            for i, (w, (_, cont)) in enumerate(zip(windows, chunk)):
                span = slice(len(w) - 1 - len(cont), len(w) - 1)
                yield float(logp[i, span].sum()), bool(greedy[i, span].all())
