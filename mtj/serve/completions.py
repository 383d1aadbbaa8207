"""The two completion endpoints (SPEC §6): OpenAI's /v1/completions (choices, echo, logprobs, usage, and the
server-sent events of a stream) and the original /complete, over the rows Admission queued."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, Response, StreamingResponse

from mtj.decode.sampling import SEED_LIMIT
from mtj.lm import LM
from mtj.serve.admission import Admission, Call
from mtj.serve.requests import BadRequest, CompleteRequest, CompletionRequest, check_model, parse
from mtj.serve.scheduler import Job


def token_logprobs(lm: LM, ids: list[int], top: int, width: int) -> tuple[list[float | None], list[dict[str, float] | None]]:
    """Each token's log-probability given the ones before it (None for the first) and the `top` most
    likely tokens at each position (by text), from one forward pass padded to `width` tokens."""
    if len(ids) < 2:
        return [None] * len(ids), [None] * len(ids)
    picked, values, best = lm.token_logprobs(ids, width)
    chosen: list[float | None] = [None, *picked.tolist()]
    tops: list[dict[str, float] | None] = [None]
    for row_values, row_ids in zip(values[:, :top].tolist(), best[:, :top].tolist()):
        alternatives: dict[str, float] = {}
        for t, v in zip(row_ids, row_values):  # most likely first; tokens that read alike keep the likelier
            alternatives.setdefault(lm.tokenizer.decode([t]), v)
        tops.append(alternatives)
    return chosen, tops


class RowFailed(RuntimeError):
    """The engine failed while a streamed row decoded."""


def sse(payload: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def row_texts(jobs: list[Job]) -> AsyncIterator[tuple[int, str, str | None]]:
    """A stream's pieces, row after row (rows decode together; their pieces are sent in order): (index, new text,
    None) as the row's text grows, then (index, "", finish_reason) when it ends. RowFailed if the engine fails."""
    for index, job in enumerate(jobs):
        sent = 0
        while True:
            kind, value = await job.events.get()
            if kind == "done" and value is not None:
                raise RowFailed(str(value))
            # whole characters that cannot begin a stop string, and the rest once the row has ended (the
            # engine's thread appends to job.text; what ready() returns is always a prefix of the end text)
            new = (job.text.text if kind == "done" else job.text.ready())[sent:]
            if new:
                yield index, new, None
                sent += len(new)
            if kind == "done":
                break
        yield index, "", job.text.finish_reason or "length"


class Completions:
    """The endpoints' handlers: each takes a request's body and its Call, and returns the response."""

    def __init__(self, admission: Admission, model_name: str, score_widths: list[int]):
        self.admission, self.lm, self.model_name = admission, admission.lm, model_name
        # scoring (echo, logprobs) pads to the prefill lengths: the compiled shapes stay few whatever clients send
        self.score_widths = score_widths

    async def complete(self, body: bytes, call: Call) -> Response:
        """The original mtj /complete: one prompt, one completion's text."""
        req = parse(CompleteRequest, body)
        self.admission.check_shape(1, True, [req.context], self.admission.least_new(req.length))
        ids = (await asyncio.to_thread(self.admission.tokenize, [req.context]))[0]
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT)
        jobs = self.admission.jobs_for(ids, req.length, req.temp, req.top_k, req.top_p, seed)
        self.admission.submit(jobs, call)
        await self.admission.finished(jobs[0])
        return JSONResponse({"completion": jobs[0].text.text})

    async def completions(self, body: bytes, call: Call) -> Response:
        """OpenAI's /v1/completions: prompts x n rows, echo, logprobs, stop strings, streamed or not."""
        req = parse(CompletionRequest, body)
        check_model(req.model, self.model_name)
        req.check()
        if req.logprobs is not None and req.stream:
            raise BadRequest("'logprobs' with 'stream' is not implemented by mtj")
        if req.max_tokens == 0 and not req.echo:
            raise BadRequest("'max_tokens': 0 needs 'echo': true (there is nothing else to return)")
        if req.stream and req.max_tokens == 0:
            raise BadRequest("'stream' with 'max_tokens': 0 has nothing to stream")
        prompts = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else list(req.prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BadRequest("'prompt' must not be empty")
        generating = req.max_tokens != 0
        self.admission.check_shape(len(prompts) * (req.n if generating else 1), generating,
                         [p for p in prompts if isinstance(p, str)], self.admission.least_new(req.max_tokens))
        ids = await asyncio.to_thread(self.admission.tokenize, prompts)
        stop = req.stops()
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT - 16)
        rows = [(i, p) for i, p in enumerate(ids) for _ in range(req.n)]  # choice index order: prompt-major
        jobs: list[Job | None] = []
        for k, (i, p) in enumerate(rows):
            if not generating:
                if len(p) > self.lm.config.seq:
                    raise BadRequest(f"the prompt has {len(p)} tokens; the context is {self.lm.config.seq}")
                jobs.append(None)
            else:
                jobs += self.admission.jobs_for(p, req.max_tokens, req.temperature, req.top_k, req.top_p, seed + k % req.n,
                                                stream=req.stream, stop=stop, **req.adjustments())
        self.admission.submit([j for j in jobs if j is not None], call)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._stream(jobs, meta, rows, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        for job in jobs:
            if job is not None:
                await self.admission.finished(job)
        if any(job is not None and job.cancelled for job in jobs):
            return Response(status_code=499)  # the client has gone: nothing to score or answer
        choices = await asyncio.to_thread(self._choices, rows, jobs, req)
        completion = sum(c.pop("_generated") for c in choices)
        prompt_tokens = sum(len(p) for p in ids)
        return JSONResponse({**meta, "choices": choices, "usage": usage(prompt_tokens, completion)})

    def scored(self, tokens: list[int], top: int) -> tuple[list[float | None], list[dict[str, float] | None]]:
        """token_logprobs of `tokens`, padded to a prefill length."""
        return token_logprobs(self.lm, tokens, top, next(w for w in self.score_widths if w >= len(tokens) - 1))

    def _choices(self, rows: list, jobs: list[Job | None], req: CompletionRequest) -> list[dict]:
        """Every row's choice; a prompt only scored (max_tokens 0) is scored once for its n rows."""
        choices, scored = [], {}
        for k, ((i, p), job) in enumerate(zip(rows, jobs)):
            if job is None and i in scored:
                choices.append({**scored[i], "index": k})
                continue
            choices.append(self._choice(k, p, job, req))
            if job is None:
                scored[i] = choices[-1]
        return choices

    def _choice(self, index: int, prompt: list[int], job: Job | None, req: CompletionRequest) -> dict:
        generated, text, reason = (job.text.kept_tokens(), job.text.text, job.text.finish_reason or "length") if job is not None \
            else ([], "", "length")
        prompt_text = self.lm.tokenizer.decode(prompt) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            ids = (prompt if req.echo else []) + generated
            start = 0 if req.echo else len(prompt)
            chosen, tops = self.scored(prompt + generated, req.logprobs)
            pieces = [self.lm.tokenizer.decode([t]) for t in ids]
            offsets, at = [], 0
            for piece in pieces:
                offsets.append(at)
                at += len(piece)
            logprobs = {"tokens": pieces, "token_logprobs": chosen[start:], "top_logprobs": tops[start:],
                        "text_offset": offsets}
        return {"text": prompt_text + text, "index": index, "logprobs": logprobs, "finish_reason": reason,
                "_generated": len(generated)}

    async def _stream(self, jobs: list[Job | None], meta: dict, rows: list, req: CompletionRequest
                      ) -> AsyncIterator[bytes]:
        completion = 0
        try:
            async for index, text, finish in row_texts(jobs):
                yield sse({**meta, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]})
                completion += len(jobs[index].text.kept_tokens()) if finish else 0
            if req.stream_options is not None and req.stream_options.include_usage:
                prompt_tokens = sum(len(p) for i, (_, p) in enumerate(rows) if i % req.n == 0)
                yield sse({**meta, "choices": [], "usage": usage(prompt_tokens, completion)})
        except RowFailed as e:
            yield sse({"error": {"message": str(e)[:500], "type": "server_error"}})
        finally:  # also when the client went away (the response task is cancelled)
            self.admission.engine.cancel([job for job in jobs if job is not None])
        yield sse(b"[DONE]")
