"""Zero-shot evaluation, scored as lm-evaluation-harness scores it (eval_harness.py).

A task is a list of (context, continuation) pairs. Each pair is scored by one
forward pass over context+continuation: the summed log-probability of the
continuation's tokens, and whether greedy decoding would produce all of them.
"""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mtj.config import Config
from mtj.generate import bucket
from mtj.model import Params, forward
from mtj.paths import PathLike, user_path
from mtj.tokenizer import Tokenizer, assets_dir

if TYPE_CHECKING:
    from mtj.lm import LM

Request = tuple[str, str]  # (context, continuation)


def lambada(path: PathLike | None = None) -> list[Request]:
    """LAMBADA (OpenAI's test set, as lm-eval's lambada_openai): predict each passage's last word."""
    if path is None:
        if assets_dir() is None:
            raise FileNotFoundError("the LAMBADA task reads $MTJ_ASSETS/eval/lambada_test.jsonl; set MTJ_ASSETS")
        path = assets_dir() / "eval" / "lambada_test.jsonl"
    requests = []
    with user_path(path).open() as f:
        for line in f:
            if line.strip():
                context, word = json.loads(line)["text"].strip().rsplit(" ", 1)
                requests.append((context, " " + word))
    return requests


TASKS: dict[str, Callable[[], list[Request]]] = {"lambada": lambada, "lambada_openai": lambada}
KNOWN_TASKS = ", ".join(sorted(TASKS))  # for messages


def encode(tok: Tokenizer, requests: Sequence[Request]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, split as lm-eval splits them: trailing
    spaces move to the continuation, which is the whole text's tokens after the context's."""
    pairs = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tok.encode(context)
        pairs.append((ctx, tok.encode(context + continuation)[len(ctx):]))
    return pairs


def _token_scores(params: Params, tokens: jax.Array, targets: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target token and whether it is the argmax; [B, T] each."""
    logp = jax.nn.log_softmax(forward(params, tokens, cfg), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


class Scorer:
    """Scores token pairs with one model config on one mesh; compiled once, given params per call
    (the training loop scores its current weights at every validation)."""

    def __init__(self, cfg: Config, mesh: Mesh, batch_size: int = 8):
        self.cfg, self.mesh, self.batch_size = cfg, mesh, batch_size
        self._score = jax.jit(functools.partial(_token_scores, cfg=cfg))

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


def summarize(scores: Iterable[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's LAMBADA metrics: greedy accuracy, and perplexity as the exp of the mean
    negative log-likelihood per example."""
    lls, greedy = zip(*scores)
    return {"acc": float(np.mean(greedy)), "ppl": math.exp(-float(np.mean(lls)))}


def evaluate(lm: LM, task: str, limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """{"task", "examples", "acc", "ppl"} of a loaded model on a task."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; known tasks: {KNOWN_TASKS}")
    pairs = encode(lm.require_tokenizer(), TASKS[task]()[:limit])
    scores = Scorer(lm.config, lm.mesh, batch_size).loglikelihoods(lm.params, pairs, progress)
    return {"task": task, "examples": len(pairs), **summarize(scores)}
