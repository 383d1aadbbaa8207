"""HTTP serving (SPEC §6): the original /complete, OpenAI completions (/v1/completions, /v1/models), /health.

The HTTP front is uvicorn + Starlette: framing, keep-alive, timeouts and the connection limit are
theirs. Every field is validated (types, finite numbers, ranges, unknown fields refused) before
anything is tokenized or queued. Requests wait in a bounded queue for the engine (mtj.engine):
continuous batching (max_batch decode slots, each freed as soon as its row ends; the default) or
the static batcher (decodes what arrived together as one batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import logging.handlers
import queue
import re
import secrets
import signal
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mtj.access import Keys, RequireKey, Shares, TooMany, caller_of
from mtj.connections import ConnectionLimits
from mtj.engine import EngineStopped, Job, SlotEngine, StaticBatcher, powers_of_two
from mtj.evaluate import TOP_LOGPROBS
from mtj.generate import SEED_LIMIT
from mtj.lm import LM
from mtj.tokenizer import Tokenizer

MAX_LOGPROBS = TOP_LOGPROBS
log = logging.getLogger(__name__)  # a line per request (mtj-serve prints them; --no-request-log)
DRAIN_BYTES = 64 << 20  # the most of an oversized body read (and dropped) so that its client reads the 413


class BadRequest(ValueError):
    """A client error: answered with `status` and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- jobs ------------------------------------------------------------------------

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


# --- requests --------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(Strict):
    """The OpenAI completions fields mtj implements (SPEC §6); any other field is refused."""

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    temperature: FiniteFloat = Field(1.0, ge=0, le=2)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: off
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    user: str | None = None  # accepted as OpenAI accepts it: an end-user id, no effect on the output
    # Client libraries send these with their neutral values on every request: those are accepted, others refused.
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    best_of: int | None = None
    logit_bias: dict[str, FiniteFloat] | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, union: Callable[[Any], Any]) -> Any:
        """A list of one item type is taken as it is; the union's members are tried item by item, and a failed
        member collects an error per item (0.15 s on the event loop for 600,000 strings), so only other input
        (and every error) goes through it."""
        if isinstance(value, list) and value:
            kinds = set(map(type, value))
            if kinds == {str} or kinds == {int} or kinds == {list} and all(set(map(type, v)) <= {int} for v in value):
                return value
        return union(value)

    @model_validator(mode="after")
    def _neutral_only(self) -> "CompletionRequest":
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"'{name}' other than 0 is not implemented by mtj")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("'best_of' other than n is not implemented by mtj")
        if self.logit_bias:
            raise ValueError("a non-empty 'logit_bias' is not implemented by mtj")
        return self


class CompleteRequest(Strict):
    """The original mtj /complete request."""

    context: str
    top_p: FiniteFloat = Field(0.9, gt=0, le=1)
    temp: FiniteFloat = Field(1.0, ge=0, le=2)
    length: int | None = Field(None, ge=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)  # None: a random one, as /v1/completions


def _describe(error: ValidationError) -> str:
    """The problems, by field, without echoing the values (which may be huge)."""
    parts = []
    for e in error.errors(include_input=False, include_url=False):
        where = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("list[", "str", "int")))
        if e["type"] == "extra_forbidden":
            parts.append(f"'{where}' is not implemented by mtj")
        elif not where:  # a check of the whole request: its message names the fields
            parts.append(str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"])
        else:
            parts.append(f"'{where}': {e['msg']}")
    return "; ".join(dict.fromkeys(parts))


def _not_a_number(constant: str) -> None:
    raise ValueError(f"{constant} is not a number")


def _shown(text: str) -> str:
    """A client's string as an error message may quote it: short, and always encodable."""
    return text[:100].encode("utf-8", "replace").decode()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key '{_shown(key)}' appears twice")
    return out


def _text_object(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are unique and whose strings are text: no lone surrogates (JSON's
    \\ud800 escapes make them; no tokenizer takes them). Strings are the fields' values or the items
    of a list (prompt, stop); deeper ones fail the request models' types anyway."""
    for key, value in pairs:
        texts = [key] + ([value] if isinstance(value, str) else
                         [v for v in value if isinstance(v, str)] if isinstance(value, list) else [])
        for text in texts:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError(f"'{_shown(key)}' holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    return _unique_keys(pairs)


# Only a \\u escape can make a surrogate (UTF-8 bytes cannot): a body without one skips the per-string check,
# which cost 40 ms of the event loop for a 600,000-string prompt list.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        data = json.loads(body, parse_constant=_not_a_number,
                          object_pairs_hook=_text_object if SURROGATE_ESCAPE.search(body) else _unique_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(_describe(e)) from None


# --- logprobs --------------------------------------------------------------------

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


def max_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token decodes to: a text of L characters has at least L / this many tokens,
    so a prompt can be found too long for the context before it is tokenized."""
    pieces = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    return max(1, *map(len, pieces))


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks, never grows without bound: past `maxsize` waiting lines, a line is dropped."""

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


def request_log(stream: Any, maxsize: int = 10_000) -> logging.handlers.QueueListener:
    """Send the request lines to `stream` from a thread of their own: the event loop only queues them, so a
    stream nobody reads (a full pipe, a stalled terminal) cannot stop the server."""
    lines: queue.Queue = queue.Queue(maxsize)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    listener = logging.handlers.QueueListener(lines, handler)
    listener.start()
    log.addHandler(_DroppingQueueHandler(lines))
    log.setLevel(logging.INFO)
    log.propagate = False  # not also through a handler some library put on the root logger (it would block)
    return listener


# --- the app ---------------------------------------------------------------------

class Server:
    """serve.py's server: `run()` serves until SIGTERM/SIGINT, then finishes the work in flight."""

    def __init__(self, lm: LM, host: str = "127.0.0.1", port: int = 5000, max_batch: int = 8, max_queue: int = 64,
                 max_tokens: int | None = None, model_name: str = "mtj", max_body_bytes: int = 4 << 20,
                 max_connections: int = 256, body_timeout_s: float = 30.0, engine: str = "continuous",
                 prefill_buckets: list[int] | None = None, head_timeout_s: float = 10.0,
                 max_connections_per_client: int = 64, api_keys: list[str] | None = None,
                 max_queue_per_key: int | None = None, allowed_origins: list[str] | None = None,
                 ssl_keyfile: str | None = None, ssl_certfile: str | None = None):
        if lm.tokenizer is None:
            raise ValueError("serving needs a tokenizer: this checkpoint has none")
        self.lm, self.model_name = lm, model_name
        self.max_tokens = max_tokens or lm.config.seq
        self.max_body, self.body_timeout = max_body_bytes, body_timeout_s
        if engine not in ("static", "continuous"):
            raise ValueError(f"--engine must be 'static' or 'continuous', got '{engine}'")
        self.engine = (SlotEngine(lm, max_batch, max_queue, prefill_buckets) if engine == "continuous"
                       else StaticBatcher(lm, max_batch, max_queue))
        # scoring (echo, logprobs) pads to the prefill lengths: the compiled shapes stay few whatever clients send
        self.score_widths = getattr(self.engine, "prefill_buckets", None) or powers_of_two(16, lm.config.seq)
        self.token_chars = max_token_chars(lm.tokenizer)
        self.created = int(time.time())
        self.keyed = bool(api_keys)
        self.shares = Shares(max_queue_per_key) if max_queue_per_key is not None else None
        if bool(ssl_keyfile) != bool(ssl_certfile):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
        # outermost first: a browser's CORS preflight carries no key, so CORS answers it before the key check
        middleware = [Middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])] if allowed_origins else []
        middleware += [Middleware(RequireKey, keys=Keys(api_keys))] if api_keys else []
        app = Starlette(middleware=middleware, routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/complete", self.complete, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_found})
        limits = ConnectionLimits(max_connections, max_connections_per_client, head_timeout_s)
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     http=limits.protocol(), limit_concurrency=max_connections + 1,
                                                     timeout_keep_alive=5, timeout_graceful_shutdown=120,
                                                     access_log=False, ssl_keyfile=ssl_keyfile,
                                                     ssl_certfile=ssl_certfile))

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, answer the requests in flight, stop the engine, return."""
        # uvicorn re-raises the signal it shut down for into the handler it found: this one, not the default (exit)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self.uvicorn, "should_exit", True))
        self.uvicorn.run()
        self.engine.stop()

    # --- plumbing -------------------------------------------------------------------
    @staticmethod
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                408: "timeout", 429: "rate_limit_exceeded", 503: "overloaded"}.get(status, "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status,
                            headers=headers)

    async def _not_found(self, request: Request, exc: Exception) -> JSONResponse:
        return self.error(404, f"no route {request.method} {request.url.path}")

    async def body(self, request: Request) -> bytes:
        """The request body, refused beyond max_body bytes (413) or when it does not arrive in time (408).
        An oversized body is read on and dropped (up to DRAIN_BYTES) before the 413, so that a client which
        sends it all before reading (urllib, most scripts) reads the answer instead of a reset connection."""
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size, too_big
            async for chunk in request.stream():
                size += len(chunk)
                too_big = too_big or size > self.max_body
                if too_big and size > DRAIN_BYTES:
                    return
                if not too_big:
                    chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            if not too_big:
                raise BadRequest(f"the body did not arrive within {self.body_timeout:g} s", 408) from None
        if too_big:
            raise BadRequest(f"the body has {declared or 'more than ' + str(self.max_body)} bytes; this server takes "
                             f"at most {self.max_body}", 413)
        return b"".join(chunks)

    async def answer(self, request: Request, handle: Callable[[bytes, Call], Awaitable[Response]]) -> Response:
        """Run an endpoint's handler on the request's body; it lists the jobs it queues in its Call, and
        they are cancelled as soon as the client goes away."""
        call = Call(caller_of(request.scope))
        jobs = call.jobs
        watcher = None
        began = time.monotonic()
        try:
            if not self.engine.alive:
                raise BadRequest("the engine has stopped; see /health", 503)
            body = await self.body(request)
            watcher = asyncio.create_task(self._cancel_when_gone(request, call))
            response = await handle(body, call)
        except ClientDisconnect:
            response = Response(status_code=499)  # nobody to answer: the connection is gone
        except BadRequest as e:
            response = self.error(e.status, str(e), {"Connection": "close"} if e.status == 413 else None)
        except TooMany as e:
            response = self.error(429, str(e), {"Retry-After": "1"})
        except (queue.Full, EngineStopped) as e:
            busy = "too many queued requests, retry later" if isinstance(e, queue.Full) else str(e)
            response = self.error(503, f"the server cannot take this request: {busy}")
        except Exception as e:  # noqa: BLE001 -- a server fault answers 500; the server keeps serving
            response = self.error(500, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            if watcher is not None:  # (a streaming response listens for the disconnect itself)
                watcher.cancel()
        # One line per request, never its text: who, what, the answer, the rows and tokens, the time.
        streamed = isinstance(response, StreamingResponse)
        log.info("%s%s %s %s %d rows=%d prompt_tokens=%d new_tokens=%s %.3fs%s", request.client.host if request.client
                 else "-", f" {call.caller}" if self.keyed else "", request.method, request.url.path, response.status_code, sum(1 for job in jobs if job),
                 sum(len(job.ids) for job in jobs if job), "-" if streamed else sum(len(job.tokens) for job in jobs if job),
                 time.monotonic() - began, " (streaming)" if streamed else "")
        return response

    async def _cancel_when_gone(self, request: Request, call: Call) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        call.gone = True
        self.engine.cancel(call.jobs)

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
                 seed: int, n: int = 1, stream: bool = False, stop: list[str] | None = None) -> list[Job]:
        """Jobs for one tokenized prompt; max_new None: up to 256 tokens, as many as fit the context. Their
        values are checked against the model when submitted (`check_job`: context, top_k, ...)."""
        if max_new is None:
            max_new = max(1, min(256, self.max_tokens, self.lm.config.seq - len(ids)))
        return [Job(ids, max_new, temperature, max(top_k, 0), top_p, seed + i, Events(), stream, list(stop or []))
                for i in range(n)]

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

    # --- endpoints ------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        if not self.engine.alive:
            reason = f"{type(self.engine.failure).__name__}: {self.engine.failure}" if self.engine.failure else "stopped"
            return JSONResponse({"status": "dead", "model": self.model_name, "error": reason}, 503)
        return JSONResponse({"status": "ok", "model": self.model_name, "queued": len(self.engine.queue),
                             "most_rows_decoded_together": self.engine.most_rows})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mtj"}]})

    async def complete(self, request: Request) -> Response:
        async def handle(body: bytes, call: Call) -> Response:
            req = parse(CompleteRequest, body)
            self.check_shape(1, True, [req.context], self.least_new(req.length))
            ids = (await asyncio.to_thread(self.tokenize, [req.context]))[0]
            seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT)
            jobs = self.jobs_for(ids, req.length, req.temp, req.top_k, req.top_p, seed)
            self.submit(jobs, call)
            await self.finished(jobs[0])
            return JSONResponse({"completion": jobs[0].text.text})

        return await self.answer(request, handle)

    async def completions(self, request: Request) -> Response:
        return await self.answer(request, self._completions)

    async def _completions(self, body: bytes, call: Call) -> Response:
        req = parse(CompletionRequest, body)
        if req.model is not None and req.model != self.model_name:
            raise BadRequest(f"the model '{_shown(req.model)}' is not served here; this server serves "
                             f"'{self.model_name}'", 404)
        if req.seed is not None and req.seed + req.n > SEED_LIMIT:
            raise BadRequest("'seed' + n must be below 2^32")
        if req.logprobs is not None and req.stream:
            raise BadRequest("'logprobs' with 'stream' is not implemented by mtj")
        if req.max_tokens == 0 and not req.echo:
            raise BadRequest("'max_tokens': 0 needs 'echo': true (there is nothing else to return)")
        if req.stream and req.max_tokens == 0:
            raise BadRequest("'stream' with 'max_tokens': 0 has nothing to stream")
        if req.stream_options is not None and not req.stream:
            raise BadRequest("'stream_options' needs 'stream': true")
        prompts = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else list(req.prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BadRequest("'prompt' must not be empty")
        generating = req.max_tokens != 0
        self.check_shape(len(prompts) * (req.n if generating else 1), generating,
                         [p for p in prompts if isinstance(p, str)], self.least_new(req.max_tokens))
        ids = await asyncio.to_thread(self.tokenize, prompts)
        stop = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]  # "" stops nothing
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_LIMIT - 16)
        rows = [(i, p) for i, p in enumerate(ids) for _ in range(req.n)]  # choice index order: prompt-major
        jobs: list[Job | None] = []
        for k, (i, p) in enumerate(rows):
            if not generating:
                if len(p) > self.lm.config.seq:
                    raise BadRequest(f"the prompt has {len(p)} tokens; the context is {self.lm.config.seq}")
                jobs.append(None)
            else:
                jobs += self.jobs_for(p, req.max_tokens, req.temperature, req.top_k, req.top_p, seed + k % req.n,
                                      stream=req.stream, stop=stop)
        self.submit([j for j in jobs if j is not None], call)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            return StreamingResponse(self._stream(jobs, meta, rows, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        for job in jobs:
            if job is not None:
                await self.finished(job)
        if any(job is not None and job.cancelled for job in jobs):
            return Response(status_code=499)  # the client has gone: nothing to score or answer
        choices = await asyncio.to_thread(self._choices, rows, jobs, req)
        completion = sum(c.pop("_generated") for c in choices)
        prompt_tokens = sum(len(p) for p in ids)
        return JSONResponse({**meta, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}})
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
            scored = prompt + generated
            width = next(w for w in self.score_widths if w >= len(scored) - 1)
            chosen, tops = token_logprobs(self.lm, scored, req.logprobs, width)
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
        def event(payload: Any) -> bytes:
            return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"

        completion = 0
        try:
            for index, job in enumerate(jobs):  # rows decode together; their events are sent in order
                sent = 0
                while True:
                    kind, value = await job.events.get()
                    if kind == "done" and value is not None:
                        yield event({"error": {"message": str(value)[:500], "type": "server_error"}})
                        yield event(b"[DONE]")
                        return
                    # whole characters that cannot begin a stop string, and the rest once the row has ended (the
                    # engine's thread appends to job.text; what ready() returns is always a prefix of the end text)
                    new = (job.text.text if kind == "done" else job.text.ready())[sent:]
                    if new:
                        yield event({**meta, "choices": [{"text": new, "index": index, "logprobs": None,
                                                          "finish_reason": None}]})
                        sent += len(new)
                    if kind == "done":
                        break
                completion += len(job.text.kept_tokens())
                yield event({**meta, "choices": [{"text": "", "index": index, "logprobs": None,
                                                  "finish_reason": job.text.finish_reason or "length"}]})
            if req.stream_options is not None and req.stream_options.include_usage:
                prompt_tokens = sum(len(p) for i, (_, p) in enumerate(rows) if i % req.n == 0)
                yield event({**meta, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                              "total_tokens": prompt_tokens + completion}})
            yield event(b"[DONE]")
        finally:  # also when the client went away (the response task is cancelled)
            self.engine.cancel([job for job in jobs if job is not None])
