"""What a request may queue (SPEC §6): its shape checked before its prompts are tokenized, its prompts
tokenized off the event loop, its jobs submitted within its caller's share and cancelled when it leaves,
and what the engine's thread tells each job delivered on the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import queue
from typing import Any, Callable

from starlette.requests import ClientDisconnect

from mtj.access import Shares
from mtj.lm import LM
from mtj.serve.requests import BadRequest
from mtj.serve.scheduler import Engine, Job
from mtj.tokenizer import Tokenizer


class Events:
    """What the engine thread tells one request's coroutine, delivered on that coroutine's event loop;
    `on_done` is called there once, at the job's first "done"."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.on_done: Callable[[], None] | None = None

    def put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _deliver(self, item: tuple) -> None:
        self.queue.put_nowait(item)
        if item[0] == "done" and self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done()

    async def get(self) -> tuple:
        return await self.queue.get()


@dataclasses.dataclass
class Call:
    """One request as the server sees it: who sent it (access.caller_of) and the jobs it queued, which are
    cancelled as soon as its client goes away."""

    caller: str
    jobs: list[Job] = dataclasses.field(default_factory=list)
    gone: bool = False  # the client has left: nothing more is queued for it


def max_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token decodes to: a text of L characters has at least L / this many tokens,
    so a prompt can be found too long for the context before it is tokenized."""
    pieces = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    return max(1, *map(len, pieces))


class Admission:
    """Takes a request's rows into the engine: refuses what cannot fit from its shape (before tokenizing),
    tokenizes, makes the jobs and queues them within the caller's share."""

    def __init__(self, lm: LM, engine: Engine, max_tokens: int, shares: Shares | None):
        self.lm, self.engine, self.max_tokens, self.shares = lm, engine, max_tokens, shares
        self.token_chars = max_token_chars(lm.tokenizer)

    def least_new(self, max_tokens: int | None) -> int:
        """The fewest new tokens a request asks for (before its prompts are tokenized); 400 past the limit."""
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise BadRequest(f"max tokens {max_tokens} exceeds this server's limit of {self.max_tokens}")
        return 1 if max_tokens is None else max_tokens

    def check_shape(self, rows: int, queued: bool, texts: list[str], new: int) -> None:
        """Before tokenizing: 400 when the request could never fit (rows, a prompt's length in characters
        against the context), 503 when the queue cannot take its rows now."""
        if rows > self.engine.max_queue:
            raise BadRequest(f"the request needs {rows} rows (prompts x n); this server queues at most "
                             f"{self.engine.max_queue}")
        seq = self.lm.config.seq
        for text in texts:
            if len(text) // self.token_chars + new > seq:
                raise BadRequest(f"a prompt of {len(text)} characters has at least {len(text) // self.token_chars} "
                                 f"tokens; with {new} new tokens that exceeds the context of {seq} tokens")
        if queued and rows > self.engine.room():
            raise queue.Full

    def tokenize(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt (text or ids, checked against the vocabulary); run off the event loop."""
        vocab = self.lm.config.n_vocab
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.lm.tokenizer.encode_batch(texts) if texts else [])
        ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        for p in ids:
            if not p:
                raise BadRequest("a prompt has no tokens")
            if min(p) < 0 or max(p) >= vocab:
                raise BadRequest(f"token ids must be in [0, {vocab})")
        return ids

    def jobs_for(self, ids: list[int], max_new: int | None, temperature: float, top_k: int, top_p: float,
                 seed: int, n: int = 1, stream: bool = False, stop: list[str] | None = None, **adjust: Any) -> list[Job]:
        """Jobs for one tokenized prompt; max_new None: up to 256 tokens, as many as fit the context; `adjust`: the
        logit adjustments (Job's repetition_penalty, ..., logit_bias). Their values are checked against the model
        when submitted (`check_job`: context, top_k, ...)."""
        if max_new is None:
            max_new = max(1, min(256, self.max_tokens, self.lm.config.seq - len(ids)))
        return [Job(ids, max_new, temperature, max(top_k, 0), top_p, seed + i, Events(), stream, list(stop or []),
                    **adjust) for i in range(n)]

    def submit(self, jobs: list[Job], call: Call) -> None:
        """Queue jobs within the caller's share (TooMany past it), listed in the call first so that they are
        cancelled if the client leaves; none are queued for a client that has left (it may leave while its
        prompts are tokenized)."""
        if call.gone:
            raise ClientDisconnect
        if self.shares is not None:
            self.shares.take(call.caller, len(jobs))
            for job in jobs:
                job.events.on_done = functools.partial(self.shares.give_back, call.caller)
        call.jobs += jobs
        try:
            self.engine.submit(jobs)
        except BaseException as e:
            if self.shares is not None:  # nothing was queued: no "done" will give the rows back
                self.shares.give_back(call.caller, len(jobs))
                for job in jobs:
                    job.events.on_done = None
            if isinstance(e, ValueError):  # values the model cannot take
                raise BadRequest(str(e)) from None
            raise

    async def finished(self, job: Job) -> None:
        """Wait until a job is done; re-raise its error."""
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                if value is not None:
                    raise value
                return
