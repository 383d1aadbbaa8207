"""Zero-shot evaluation, scored as lm-evaluation-harness scores it (eval_harness.py).

A task is a list of (context, continuation) pairs. Each pair is scored by one
forward pass over context+continuation: the summed log-probability of the
continuation's tokens, and whether greedy decoding would produce all of them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mtj.generate import bucket
from mtj.lm import LM
from mtj.model import forward
from mtj.tokenizer import assets_dir

Request = tuple[str, str]  # (context, continuation)


def lambada(path: str | Path | None = None) -> list[Request]:
    """LAMBADA (OpenAI's test set, as lm-eval's lambada_openai): predict each passage's last word."""
    if path is None:
        if assets_dir() is None:
            raise FileNotFoundError("the LAMBADA task reads $MTJ_ASSETS/eval/lambada_test.jsonl; set MTJ_ASSETS")
        path = assets_dir() / "eval" / "lambada_test.jsonl"
    requests = []
    with open(path) as f:
        for line in f:
            if line.strip():
                context, word = json.loads(line)["text"].strip().rsplit(" ", 1)
                requests.append((context, " " + word))
    return requests


TASKS: dict[str, Callable[[], list[Request]]] = {"lambada": lambada, "lambada_openai": lambada}


def encode(lm: LM, requests: Sequence[Request]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, split as lm-eval splits them: trailing
    spaces move to the continuation, which is the whole text's tokens after the context's."""
    tok = lm.require_tokenizer()
    pairs = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tok.encode(context)
        pairs.append((ctx, tok.encode(context + continuation)[len(ctx):]))
    return pairs


def _token_scores(params: dict, tokens: jax.Array, targets: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each target token and whether it is the argmax; [B, T] each."""
    logp = jax.nn.log_softmax(forward(params, tokens, cfg), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


def loglikelihoods(lm: LM, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                   progress: bool = True) -> Iterator[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, greedy match) per (context, continuation) pair.
    Contexts longer than the model's window lose their oldest tokens."""
    seq = lm.config.seq
    score = jax.jit(functools.partial(_token_scores, cfg=lm.config))
    for start in tqdm(range(0, len(pairs), batch_size), desc="scoring", unit="batch", disable=not progress):
        chunk = pairs[start:start + batch_size]
        windows = []
        for ctx, cont in chunk:
            if not cont or len(cont) > seq:
                raise ValueError(f"a continuation needs 1 to {seq} tokens, got {len(cont)}")
            windows.append((ctx + cont)[-(seq + 1):])
        width = min(bucket(max(len(w) for w in windows) - 1), seq)
        tokens = np.zeros((batch_size, width), np.int32)  # right-padded: a causal model never sees the padding
        targets = np.zeros((batch_size, width), np.int32)
        for i, w in enumerate(windows):
            tokens[i, : len(w) - 1], targets[i, : len(w) - 1] = w[:-1], w[1:]
        with jax.set_mesh(lm.mesh):
            logp, greedy = (np.asarray(a) for a in score(lm.params, tokens, targets))
        for i, (w, (_, cont)) in enumerate(zip(windows, chunk)):
            span = slice(len(w) - 1 - len(cont), len(w) - 1)
            yield float(logp[i, span].sum()), bool(greedy[i, span].all())


def evaluate(lm: LM, task: str, limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """{"task", "examples", "acc", "ppl"}: greedy accuracy and perplexity (exp of the mean negative
    log-likelihood per example), lm-eval's metrics for LAMBADA."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; known tasks: {', '.join(sorted(TASKS))}")
    requests = TASKS[task]()[:limit]
    scores = list(loglikelihoods(lm, encode(lm, requests), batch_size, progress))
    return {"task": task, "examples": len(scores), "acc": float(np.mean([g for _, g in scores])),
            "ppl": math.exp(-float(np.mean([ll for ll, _ in scores])))}
