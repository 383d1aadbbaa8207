"""OpenAI's /v1/chat/completions (SPEC §6): the messages rendered with the model's chat template (mtj.chat) into
one prompt, its n rows decoded as a completion's, answered as assistant messages (streamed as chunks of deltas)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import AsyncIterator

from starlette.responses import JSONResponse, Response, StreamingResponse

from mtj.chat import ChatTemplate, ChatTemplateError
from mtj.decode.sampling import SEED_LIMIT
from mtj.serve.admission import Call
from mtj.serve.completions import Completions, RowFailed, row_texts, sse, usage
from mtj.serve.requests import BadRequest, Chat, ChatRequest, check_model, parse
from mtj.serve.scheduler import Job

NO_TEMPLATE = ("this model has no chat template (its tokenizer_config.json has no 'chat_template'): serve it with "
               "--chat-template FILE, or send the prompt to /v1/completions")


def render(template: ChatTemplate | None, chat: Chat) -> str:
    """The prompt text of a request's messages; 400 without a template or when the template refuses them."""
    if template is None:
        raise BadRequest(NO_TEMPLATE)
    try:
        return template.render(chat.for_template(), chat.add_generation_prompt)
    except ChatTemplateError as e:
        raise BadRequest(str(e)) from None


class ChatCompletions:
    def __init__(self, completions: Completions, template: ChatTemplate | None):
        self.completions, self.admission, self.template = completions, completions.admission, template

    async def chat(self, body: bytes, call: Call) -> Response:
        req = parse(ChatRequest, body)
        check_model(req.model, self.completions.model_name)
        req.check()
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true")
        if req.logprobs and req.stream:
            raise BadRequest("'logprobs' with 'stream' is not implemented by mtj")
        new = req.new_tokens()
        text = await asyncio.to_thread(render, self.template, req)
        self.admission.check_shape(req.n, True, [text], self.admission.least_new(new))
        ids = (await asyncio.to_thread(self.admission.tokenize, [text]))[0]
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT - 16)
        jobs = self.admission.jobs_for(ids, new, req.temperature, req.top_k, req.top_p, seed, n=req.n,
                                       stream=req.stream, stop=req.stops(), **req.adjustments())
        self.admission.submit(jobs, call)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.completions.model_name}
        if req.stream:
            return StreamingResponse(self._stream(jobs, len(ids), meta, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        for job in jobs:
            await self.admission.finished(job)
        if any(job.cancelled for job in jobs):
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": job.text.text},
                    "logprobs": await asyncio.to_thread(self._logprobs, ids, job, req.top_logprobs or 0)
                    if req.logprobs else None, "finish_reason": job.text.finish_reason or "length"}
                   for i, job in enumerate(jobs)]
        completion = sum(len(job.text.kept_tokens()) for job in jobs)
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": usage(len(ids), completion)})

    def _logprobs(self, prompt: list[int], job: Job, top: int) -> dict:
        """OpenAI's `logprobs.content`: each generated token, its log-probability and the `top` likeliest."""
        generated = job.text.kept_tokens()
        chosen, tops = self.completions.scored(prompt + generated, top)
        decode = self.admission.lm.tokenizer.decode

        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**entry(decode([t]), chosen[k]), "top_logprobs": [entry(*kv) for kv in tops[k].items()]}
                            for k, t in enumerate(generated, start=len(prompt))]}

    async def _stream(self, jobs: list[Job], prompt_tokens: int, meta: dict, req: ChatRequest) -> AsyncIterator[bytes]:
        meta = {**meta, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict, finish: str | None) -> bytes:
            return sse({**meta, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        completion, opened = 0, set()
        try:
            async for index, text, finish in row_texts(jobs):
                if index not in opened:  # each choice's first chunk says whose message it is
                    opened.add(index)
                    yield chunk(index, {"role": "assistant", "content": ""}, None)
                yield chunk(index, {"content": text} if text else {}, finish)
                completion += len(jobs[index].text.kept_tokens()) if finish else 0
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse({**meta, "choices": [], "usage": usage(prompt_tokens, completion)})
        except RowFailed as e:
            yield sse({"error": {"message": str(e)[:500], "type": "server_error"}})
        finally:  # also when the client went away (the response task is cancelled)
            self.admission.engine.cancel(jobs)
        yield sse(b"[DONE]")
