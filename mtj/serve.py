"""HTTP serving (SPEC §6): the original /complete, OpenAI-style /v1/completions with SSE, /health.

Requests wait in a bounded queue; one worker thread takes everything that
arrived together (up to max_batch) and decodes it as one batch on the device.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from mtj.lm import LM, truncate_at_stop


class BadRequest(ValueError):
    """A client error: answered with 400 and this message."""


@dataclasses.dataclass
class Job:
    """One sequence to generate; `events` receives ("tokens", list) while streaming and ("done", None|error)."""

    ids: list[int]
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stream: bool = False
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    tokens: list[int] = dataclasses.field(default_factory=list)


class Batcher:
    """Collects jobs that arrive together and runs them as one generate call."""

    def __init__(self, lm: LM, max_batch: int = 8, max_queue: int = 64, wait_s: float = 0.01):
        self.lm, self.max_batch, self.wait_s = lm, max_batch, wait_s
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mtj-batcher", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs; raises queue.Full when the server is overloaded."""
        if self.jobs.maxsize and self.jobs.qsize() + len(jobs) > self.jobs.maxsize:
            raise queue.Full
        for job in jobs:
            self.jobs.put_nowait(job)

    def _take(self) -> list[Job]:
        try:
            batch = [self.jobs.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not (self.stopping.is_set() and self.jobs.empty()):
            batch = self._take()
            if not batch:
                continue
            eos = self.lm.tokenizer.eos_id if self.lm.tokenizer else None

            def on_tokens(step: int, tokens: np.ndarray) -> None:
                for job, token in zip(batch, tokens.tolist()):
                    finished = len(job.tokens) >= job.max_new or (job.tokens and job.tokens[-1] == eos)
                    if not finished:
                        job.tokens.append(token)
                        if job.stream:
                            job.events.put(("tokens", [token]))

            try:
                outs = self.lm.generate_tokens([j.ids for j in batch], max(j.max_new for j in batch),
                                               [j.temperature for j in batch], [j.top_k for j in batch],
                                               [j.top_p for j in batch], [j.seed for j in batch], on_tokens)
                for job, out in zip(batch, outs):
                    job.tokens = out[: job.max_new]
                    job.events.put(("done", None))
            except Exception as e:  # the batch fails, the server keeps serving
                for job in batch:
                    job.events.put(("done", e))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)


# --- request parsing ---------------------------------------------------------------

def _number(body: dict, key: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"'{key}' must be a {'integer' if kind is int else 'number'}, got {value!r}")
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"'{key}' must be in [{lo}, {hi}], got {value}")
    return value


class Server:
    def __init__(self, lm: LM, host: str = "127.0.0.1", port: int = 5000, max_batch: int = 8, max_queue: int = 64,
                 max_tokens: int | None = None, model_name: str = "mtj"):
        if lm.tokenizer is None:
            raise ValueError("serving needs a tokenizer: this checkpoint has none")
        self.lm, self.model_name = lm, model_name
        self.max_tokens = max_tokens or lm.config.seq
        self.batcher = Batcher(lm, max_batch, max_queue)
        ThreadingHTTPServer.request_queue_size = 256  # listen backlog: bursts of clients must not be reset
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True  # idle keep-alive connections must not hold up shutdown...
        self.in_flight = 0  # ...but requests being answered do
        self.answered = threading.Condition()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop accepting, finish queued work, deliver its answers, close."""
        self.httpd.shutdown()
        self.batcher.stop()
        with self.answered:
            self.answered.wait_for(lambda: self.in_flight == 0, timeout=60)
        self.httpd.server_close()

    def jobs_for(self, prompt: str, max_new: int | None, temperature: float, top_k: int, top_p: float, seed: int,
                 n: int = 1, stream: bool = False) -> list[Job]:
        """Jobs for one prompt; max_new None: up to 256 tokens, as many as fit the context."""
        ids = self.lm.tokenizer.encode(prompt)
        if not ids:
            raise BadRequest("the prompt is empty")
        if max_new is None:
            max_new = max(1, min(256, self.max_tokens, self.lm.config.seq - len(ids)))
        if max_new > self.max_tokens:
            raise BadRequest(f"max tokens {max_new} exceeds this server's limit of {self.max_tokens}")
        if len(ids) + max_new > self.lm.config.seq:
            raise BadRequest(f"the prompt has {len(ids)} tokens; with {max_new} new tokens that exceeds the "
                             f"context of {self.lm.config.seq} tokens")
        return [Job(ids, max_new, temperature, top_k, top_p, seed + i, stream) for i in range(n)]


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet; errors are answered to the client
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            kind = {400: "invalid_request_error", 503: "overloaded", 404: "not_found"}.get(code, "server_error")
            self._send(code, {"error": {"message": message, "type": kind}})

        def do_GET(self) -> None:
            try:
                if self.path == "/health":
                    self._send(200, {"status": "ok", "model": server.model_name, "queued": server.batcher.jobs.qsize()})
                else:
                    self._error(404, f"no route {self.path}")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up

        def do_POST(self) -> None:
            with server.answered:
                server.in_flight += 1
            try:
                self._post()
            finally:
                with server.answered:
                    server.in_flight -= 1
                    server.answered.notify_all()

        def _post(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadRequest(f"the body is not valid JSON: {e}") from None
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                if self.path == "/complete":
                    self._complete(body)
                elif self.path == "/v1/completions":
                    self._openai(body)
                else:
                    self._error(404, f"no route {self.path}")
            except BadRequest as e:
                self._error(400, str(e))
            except queue.Full:
                self._error(503, "the server is overloaded: too many queued requests, retry later")
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:  # noqa: BLE001 - a bug must not take the server down
                self._error(500, f"{type(e).__name__}: {e}")

        def _wait(self, jobs: list[Job]) -> None:
            for job in jobs:
                kind, err = job.events.get()
                while kind != "done":
                    kind, err = job.events.get()
                if err is not None:
                    raise err

        def _complete(self, body: dict) -> None:
            context = body.get("context")
            if not isinstance(context, str):
                raise BadRequest("'context' must be a string")
            length = None if body.get("length") is None else _number(body, "length", 256, int, 1)
            jobs = server.jobs_for(context, length, _number(body, "temp", 1.0, float, 0),
                                   _number(body, "top_k", 0, int, 0), _number(body, "top_p", 0.9, float, 0, 1),
                                   _number(body, "seed", 0, int, 0))
            server.batcher.submit(jobs)
            self._wait(jobs)
            self._send(200, {"completion": server.lm.decode_new(jobs[0].tokens)})

        def _openai(self, body: dict) -> None:
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise BadRequest("'prompt' must be a string or a non-empty list of strings")
            stop = body.get("stop")
            stop = [stop] if isinstance(stop, str) else (stop or [])
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise BadRequest("'stop' must be a string or a list of strings")
            n = _number(body, "n", 1, int, 1, 16)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("'stream' must be true or false")
            params = dict(max_new=_number(body, "max_tokens", 16, int, 1), temperature=_number(body, "temperature", 1.0, float, 0, 2),
                          top_k=_number(body, "top_k", 0, int, 0), top_p=_number(body, "top_p", 1.0, float, 0, 1),
                          seed=_number(body, "seed", 0, int, 0))
            jobs = [job for p in prompts for job in server.jobs_for(p, n=n, stream=stream, **params)]
            server.batcher.submit(jobs)
            meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                    "model": server.model_name}
            if stream:
                self._stream(jobs, stop, meta)
                return
            self._wait(jobs)
            choices = []
            for i, job in enumerate(jobs):
                full = server.lm.decode_new(job.tokens)
                text = truncate_at_stop(full, stop)
                eos = server.lm.tokenizer.eos_id
                finished = text != full or (job.tokens and job.tokens[-1] == eos)
                choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": "stop" if finished else "length"})
            completion = sum(len(j.tokens) for j in jobs)
            prompt_tokens = sum(len(j.ids) for j in jobs[::n])
            self._send(200, {**meta, "choices": choices, "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}})

        def _stream(self, jobs: list[Job], stop: list[str], meta: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            hold = max((len(s) for s in stop), default=1) - 1  # text that might start a stop string

            def event(payload: Any) -> None:
                self.wfile.write(b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n")
                self.wfile.flush()

            for i, job in enumerate(jobs):  # rows decode together; their events are sent in order
                tokens, sent, reason = [], 0, "length"
                while True:
                    kind, value = job.events.get()
                    if kind == "done":
                        if value is not None:
                            event({"error": {"message": str(value), "type": "server_error"}})
                            event(b"[DONE]")
                            return
                        tokens = job.tokens
                    else:
                        tokens = tokens + value
                    full = server.lm.decode_new(tokens)
                    text = truncate_at_stop(full, stop)
                    stopped = text != full
                    ready = len(text) if (kind == "done" or stopped) else max(sent, len(text) - hold)
                    if text.endswith("\ufffd") and kind != "done":
                        ready = min(ready, len(text) - 1)  # an unfinished multi-byte character
                    if ready > sent:
                        event({**meta, "choices": [{"text": text[sent:ready], "index": i, "logprobs": None,
                                                    "finish_reason": None}]})
                        sent = ready
                    if stopped or (tokens and tokens[-1] == server.lm.tokenizer.eos_id):
                        reason = "stop"
                    if kind == "done" or stopped:
                        if kind != "done":
                            while job.events.get()[0] != "done":
                                pass
                        break
                event({**meta, "choices": [{"text": "", "index": i, "logprobs": None, "finish_reason": reason}]})
            event(b"[DONE]")

    return Handler
