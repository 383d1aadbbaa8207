"""HTTP serving (SPEC §6): the original /complete, OpenAI completions (/v1/completions, /v1/chat/completions,
/v1/models), vLLM's /tokenize and /detokenize, /health, Prometheus metrics (/metrics).

The HTTP front is uvicorn + Starlette: framing, keep-alive, timeouts and the connection limit are
theirs; this module adds the body limits, the errors' shape, the per-request log line and the cancelling
of a departed client's rows. Requests wait in a bounded queue for the engine (scheduler): continuous
batching (max_batch decode slots, each freed as soon as its row ends; the default) or the static batcher
(decodes what arrived together as one batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import queue
import signal
import time
from typing import Any, Awaitable, Callable

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mtj.access import Keys, RequireKey, Shares, TooMany, caller_of
from mtj.connections import ConnectionLimits
from mtj.decode.slots import powers_of_two
from mtj.lm import LM
from mtj.serve.admission import Admission, Call
from mtj.serve.chat import ChatCompletions
from mtj.serve.completions import Completions
from mtj.serve.requests import BadRequest
from mtj.serve.scheduler import EngineStopped, SlotEngine, StaticBatcher
from mtj.serve.tokenization import Tokenization

log = logging.getLogger("mtj.serve")  # a line per request (mtj-serve prints them; --no-request-log)
DRAIN_BYTES = 64 << 20  # the most of an oversized body read (and dropped) so that its client reads the 413


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


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            408: "timeout", 429: "rate_limit_exceeded", 503: "overloaded"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status,
                        headers=headers)


def make_engine(lm: LM, engine: str, max_batch: int, max_queue: int, prefill_buckets: list[int] | None,
                prefix_cache_gb: float, speculate: int, draft: LM | None = None) -> SlotEngine | StaticBatcher:
    if engine not in ("static", "continuous"):
        raise ValueError(f"--engine must be 'static' or 'continuous', got '{engine}'")
    if engine == "static":
        if prefix_cache_gb or speculate or draft:
            raise ValueError("--prefix-cache-gb, --speculate and --draft-ckpt need the continuous engine")
        return StaticBatcher(lm, max_batch, max_queue)
    return SlotEngine(lm, max_batch, max_queue, prefill_buckets, prefix_cache_gb, speculate, draft)


class Server:
    """serve.py's server: `run()` serves until SIGTERM/SIGINT, then finishes the work in flight."""

    def __init__(self, lm: LM, host: str = "127.0.0.1", port: int = 5000, max_batch: int = 8, max_queue: int = 64,
                 max_tokens: int | None = None, model_name: str = "mtj", max_body_bytes: int = 4 << 20,
                 max_connections: int = 256, body_timeout_s: float = 30.0, engine: str = "continuous",
                 prefill_buckets: list[int] | None = None, prefix_cache_gb: float = 0.0, speculate: int = 0,
                 draft: LM | None = None, head_timeout_s: float = 10.0,
                 max_connections_per_client: int = 64, api_keys: list[str] | None = None,
                 max_queue_per_key: int | None = None, allowed_origins: list[str] | None = None,
                 ssl_keyfile: str | None = None, ssl_certfile: str | None = None, chat_template: str | None = None):
        if lm.tokenizer is None:
            raise ValueError("serving needs a tokenizer: this checkpoint has none")
        template = lm.tokenizer.chat(chat_template)  # chat_template: a template's source, else the tokenizer's
        self.model_name = model_name
        self.max_body, self.body_timeout = max_body_bytes, body_timeout_s
        self.engine = make_engine(lm, engine, max_batch, max_queue, prefill_buckets, prefix_cache_gb, speculate, draft)
        shares = Shares(max_queue_per_key) if max_queue_per_key is not None else None
        self.endpoints = Completions(Admission(lm, self.engine, max_tokens or lm.config.seq, shares), model_name,
                                     getattr(self.engine, "prefill_buckets", None) or powers_of_two(16, lm.config.seq))
        chat = ChatCompletions(self.endpoints, template)
        tokens = Tokenization(lm, model_name, template)
        self.created = int(time.time())
        self.keyed = bool(api_keys)
        if bool(ssl_keyfile) != bool(ssl_certfile):
            raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
        # outermost first: a browser's CORS preflight carries no key, so CORS answers it before the key check
        middleware = [Middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])] if allowed_origins else []
        middleware += [Middleware(RequireKey, keys=Keys(api_keys))] if api_keys else []
        app = Starlette(middleware=middleware, routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            *(Route(path, self.endpoint(handle), methods=["POST"]) for path, handle in (
                ("/complete", self.endpoints.complete), ("/v1/completions", self.endpoints.completions),
                ("/v1/chat/completions", chat.chat),
                ("/tokenize", tokens.tokenize), ("/detokenize", tokens.detokenize))),
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
    async def _not_found(self, request: Request, exc: Exception) -> JSONResponse:
        return error(404, f"no route {request.method} {request.url.path}")

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
            response = error(e.status, str(e), {"Connection": "close"} if e.status == 413 else None)
        except TooMany as e:
            response = error(429, str(e), {"Retry-After": "1"})
        except (queue.Full, EngineStopped) as e:
            busy = "too many queued requests, retry later" if isinstance(e, queue.Full) else str(e)
            response = error(503, f"the server cannot take this request: {busy}")
        except Exception as e:  # noqa: BLE001 -- a server fault answers 500; the server keeps serving
            response = error(500, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            if watcher is not None:  # (a streaming response listens for the disconnect itself)
                watcher.cancel()
        self.engine.metrics.requests.labels(request.url.path, str(response.status_code)).inc()
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

    async def metrics(self, request: Request) -> Response:
        return Response(self.engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def endpoint(self, handle: Callable[[bytes, Call], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """A POST route's endpoint: `answer` with the handler."""
        async def answered(request: Request) -> Response:
            return await self.answer(request, handle)

        return answered
