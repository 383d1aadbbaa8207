"""The server keeps serving whatever any one client sends or does (each finding of the careless- and
hostile-client audit, reproduced on both engines through the real server), a fuzz of both, and a
bounded set of compiled programs whatever prompt lengths clients send."""

import concurrent.futures
import json
import socket
import threading
import time

import numpy as np
import pytest

import mtj
from conftest import hf_gptj
from mtj.decode.slots import powers_of_two
from mtj.serve import Server
from mtj.serve.scheduler import Job, SlotEngine, StaticBatcher
from mtj.tokenizer import load_tokenizer
from test_serve import Running, free_port, request

ENGINES = ["continuous", "static"]
GOOD = {"prompt": "A neighbour of", "max_tokens": 8, "temperature": 0}
HEAD_TIMEOUT = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # sharp logits (init std 0.3): greedy tokens do not hinge on the rounding of one batch shape or another
    path = hf_gptj(tmp_path_factory.mktemp("faults") / "hf", vocab_size=50257, n_positions=128, n_embd=32, n_head=4,
                   rotary_dim=4, bos_token_id=50256, eos_token_id=50256, initializer_range=0.3)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=ENGINES)
def server(request, ckpt):
    srv = Running(ckpt, "--engine", request.param, "--head-timeout", str(HEAD_TIMEOUT))
    srv.good = text_of(request_json(srv.port, "/v1/completions", GOOD))  # what GOOD gets alone
    yield srv
    assert srv.stop() == 0


def request_json(port, path, body=None, raw=None, timeout=120):
    status, text = request(port, path, body, raw=raw, timeout=timeout)
    return status, json.loads(text) if text else None


def text_of(reply):
    status, out = reply
    assert status == 200, out
    return out["choices"][0]["text"]


def beside(port, path, bad=None, raw=None, good=GOOD):
    """Send a bad request and a good one at once: (the bad one's status and body, the good one's text)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad_reply = pool.submit(request_json, port, path, bad, raw)
        good_text = text_of(request_json(port, "/v1/completions", good))
        return bad_reply.result(), good_text


def assert_serving(srv, good=GOOD):
    assert request(srv.port, "/health", timeout=5)[0] == 200
    assert text_of(request_json(srv.port, "/v1/completions", good)) == srv.good


# --- 1. a value no engine can take fails its request alone -------------------------------------

def test_out_of_range_values_fail_alone(server):
    for path, bad in [("/complete", {"context": "Hello", "top_k": 2147483648, "length": 4}),
                      ("/complete", {"context": "Hello", "top_k": 2**64, "length": 4}),
                      ("/v1/completions", {"prompt": "Hello", "top_k": 50258, "max_tokens": 4})]:
        (status, body), text = beside(server.port, path, bad)
        assert status == 400 and "top_k" in body["error"]["message"], body
        assert text == server.good
    assert_serving(server)


class Events:
    def __init__(self):
        self.got = []
        self.done = threading.Event()

    def put(self, event):
        self.got.append(event)
        if event[0] == "done":
            self.done.set()


def job(**kw) -> Job:
    return Job(**{"ids": [1, 2], "max_new": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0,
                  "events": Events(), **kw})


@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_refuses_a_job_it_cannot_decode_and_fails_one_alone(ckpt, engine):
    lm = mtj.load(ckpt)
    engine = SlotEngine(lm, slots=2) if engine == "continuous" else StaticBatcher(lm)
    try:
        for bad, word in [(dict(top_k=2**31), "top_k"), (dict(seed=2**32), "seed"), (dict(ids=[50257]), "token ids"),
                          (dict(max_new=127), "context"), (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature")]:
            with pytest.raises(ValueError, match=word):
                engine.submit([job(**bad)])
        assert engine.room() == engine.max_queue  # nothing was queued
        # past the check (as a bug in it would let through): that job fails, its neighbours decode
        jobs = [job(), job(top_k=2**31), job(seed=3)]
        with engine.changed:
            engine.queue.extend(jobs)
            engine.changed.notify()
        for j in jobs:
            assert j.events.done.wait(60)
        assert jobs[0].events.got[-1] == ("done", None) and jobs[2].events.got[-1] == ("done", None)
        assert isinstance(jobs[1].events.got[-1][1], Exception) and engine.alive
        assert jobs[0].tokens == jobs[2].tokens == lm.generate_tokens([[1, 2]], 4, temperature=0)[0]
    finally:
        engine.stop()


# --- 2. requests that fit alone are served together -------------------------------------------

def test_a_long_prompt_and_a_long_generation_each_fit_alone_and_together(server):
    rng = np.random.RandomState(0)
    long_prompt = {"prompt": rng.randint(0, 50000, 120).tolist(), "max_tokens": 8, "temperature": 0}
    long_output = {"prompt": rng.randint(0, 50000, 4).tolist(), "max_tokens": 100, "temperature": 0}
    alone = [text_of(request_json(server.port, "/v1/completions", body)) for body in (long_prompt, long_output)]
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda b: text_of(request_json(server.port, "/v1/completions", b)),
                                     [long_prompt, long_output]))
        assert together == alone
    assert_serving(server)


# --- 3. slow request heads -------------------------------------------------------------------

def test_connections_that_never_finish_their_heads_cost_nothing(server):
    held = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        held.append(s)
    start = time.monotonic()
    assert request(server.port, "/health", timeout=5)[0] == 200
    assert time.monotonic() - start < 1.0
    assert text_of(request_json(server.port, "/v1/completions", GOOD)) == server.good
    time.sleep(HEAD_TIMEOUT + 1)
    for s in held:  # every stale connection is closed by now (408 or nothing, then end of stream)
        s.settimeout(2)
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
        assert answer in (b"", ) or answer.startswith(b"HTTP/1.1 408"), answer[:100]
        s.close()
    assert_serving(server)


# --- 4, 3rd acceptance point: compiled programs stay within the bucket set ------------------------

class InProcess:
    """The real server (uvicorn on 127.0.0.1) in this process, so that a test can look inside it."""

    def __init__(self, lm, **kw):
        self.server = Server(lm, port=free_port(), **kw)
        self.server.engine.warm()
        self.port = self.server.uvicorn.config.port
        self.thread = threading.Thread(target=self.server.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> float:
        """Shut down as SIGTERM does; seconds it took."""
        start = time.monotonic()
        self.server.uvicorn.should_exit = True
        self.thread.join(timeout=60)
        self.server.engine.stop()
        return time.monotonic() - start


@pytest.mark.parametrize("engine", ENGINES)
def test_compiled_programs_are_those_of_the_buckets(ckpt, engine):
    lm = mtj.load(ckpt)
    srv = InProcess(lm, engine=engine)  # (warmed: every prefill bucket and decode span compiled)
    slots = srv.server.engine
    compiled = lambda: (slots._insert._cache_size(), slots._prefill._cache_size(), set(slots._decoders),  # noqa: E731
                        [fn._cache_size() for fn in slots._decoders.values()])
    if engine == "continuous":
        warm = compiled()
        assert warm[1] == len(slots.prefill_buckets) and all(n == 1 for n in warm[3])
    try:
        rng = np.random.RandomState(1)
        lengths = rng.randint(1, 121, 200)
        for i, n in enumerate(lengths):
            ids = rng.randint(0, 50000, n).tolist()
            new = int(rng.randint(1, 129 - n)) if engine == "continuous" else int(rng.randint(1, min(16, 128 - n) + 1))
            body = ({"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2} if i % 2 else
                    {"prompt": ids, "max_tokens": new, "temperature": float(i % 4 == 0), "logprobs": 1})
            assert request(srv.port, "/v1/completions", body)[0] == 200
        assert len(set(lengths)) > 80
        assert lm._top_scores._cache_size() <= len(srv.server.endpoints.score_widths) and lm._forward._cache_size() == 0
        if engine == "continuous":
            assert compiled() == warm  # traffic compiled nothing more
        else:  # one request at a time: batch 1, prompts padded to powers of two, new tokens likewise (up to
            # 16 here: the static engine compiles a program per prompt and new-token bucket, each slow to compile)
            programs = lm.generator._compiled
            assert {key[0] for key in programs} == {16}  # (key: new tokens, streaming, greedy, speculation)
            assert all(fn._cache_size() <= len(powers_of_two(16, 128)) for fn in programs.values())
    finally:
        srv.stop()


# --- 5. an engine that fails answers everyone and stops promptly ---------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the engine's thread dies)
@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_engine_answers_every_request_at_once(ckpt, engine):
    srv = InProcess(mtj.load(ckpt), engine=engine, max_batch=1)
    body = {"prompt": "Before the failure", "max_tokens": 100, "temperature": 1.0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = [pool.submit(request_json, srv.port, "/v1/completions", body, None, 30) for _ in range(4)]
        deadline = time.monotonic() + 30
        while request_json(srv.port, "/health")[1]["queued"] < 2:  # one decoding, the others queued
            assert time.monotonic() < deadline
        broken = RuntimeError("injected: the device stopped")
        if engine == "continuous":  # the next decode step fails (as on a device fault)
            srv.server.engine._decode_call = lambda *_: (_ for _ in ()).throw(broken)
        else:  # the batcher's thread fails between batches
            srv.server.engine._next_batch = lambda: (_ for _ in ()).throw(broken)
        statuses = sorted(reply.result()[0] for reply in replies)  # (each within 30 s)
    assert set(statuses) <= {200, 500, 503} and statuses.count(503) >= 2, statuses
    status, health = request_json(srv.port, "/health")
    assert status == 503 and health["status"] == "dead"
    status, out = request_json(srv.port, "/v1/completions", GOOD)
    assert status == 503 and "stopped" in out["error"]["message"]
    assert srv.stop() < 5


# --- 6. room is checked from the request's shape, tokenizing runs off the event loop -------------

def health_latency_during(port, send) -> tuple[tuple, float]:
    """The reply of send() and the longest /health round trip while it ran."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(send)
        worst = 0.0
        while not reply.done():
            start = time.monotonic()
            assert request(port, "/health", timeout=10)[0] == 200
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.02)
        return reply.result(), worst


def test_oversized_requests_are_refused_before_tokenizing(server):
    for body, word in [({"prompt": ["x"] * 600_000, "max_tokens": None}, "rows"),
                       ({"prompt": ["x"] * 100, "max_tokens": 0, "echo": True}, "rows"),
                       ({"prompt": "word " * 700_000, "max_tokens": None}, "context"),
                       ({"prompt": "word " * 700_000, "max_tokens": 0, "echo": True}, "context")]:
        start = time.monotonic()
        (status, out), worst = health_latency_during(server.port, lambda: request_json(server.port, "/v1/completions", body))
        assert status == 400 and word in out["error"]["message"], out
        assert time.monotonic() - start < 3 and worst < 1.0, (time.monotonic() - start, worst)
    assert_serving(server)


# --- 7. a client that hangs up: its rows end whether it streamed or not -----------------------

def post_and_leave(port, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def departed_lines(srv, since: int, count: int) -> list[str]:
    """The server's log lines of the next `count` completion requests after line `since` (60 s at most)."""
    deadline = time.monotonic() + 60
    while len(lines := [line for line in srv.lines[since:] if "POST /v1/completions" in line]) < count:
        assert time.monotonic() < deadline, srv.lines[since:]
        time.sleep(0.05)
    return lines


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("leave", ["when queued", "at once"])
def test_abandoned_requests_give_back_their_rows(server, stream, leave):
    """A client that hangs up while its rows wait frees them at once; one that hangs up at once (while the
    server still reads or tokenizes its prompt) gets none queued: nothing is decoded for nobody."""
    body = {"prompt": "Nobody waits for", "n": 16, "max_tokens": 120, "temperature": 1.0, "stream": stream}
    since = len(server.lines)
    gone = [post_and_leave(server.port, body) for _ in range(4)]  # 64 rows: the whole queue
    deadline = time.monotonic() + 10
    while leave == "when queued" and request_json(server.port, "/health")[1]["queued"] < 32:
        assert time.monotonic() < deadline
    for s in gone:
        s.close()
    if leave == "at once":
        lines = departed_lines(server, since, 4)
        decoded = [int(line.split("new_tokens=")[1].split()[0]) for line in lines if "(streaming)" not in line]
        assert sum(decoded) < 8 * 120, lines  # not every row decoded to its end (at most the slots' first rows)
    start = time.monotonic()
    while request_json(server.port, "/health")[1]["queued"] > 0:
        assert time.monotonic() - start < 1.0, "rows of departed clients stay queued"
        time.sleep(0.02)
    assert_serving(server)


# --- 8. an oversized body sent before reading gets its 413 ------------------------------------

def test_a_client_that_sends_all_of_a_large_body_reads_the_413(server):
    big = json.dumps({"prompt": "x" * (5 << 20)}).encode()
    (status, out), text = beside(server.port, "/v1/completions", raw=big)  # urllib: writes it all, then reads
    assert status == 413 and "at most" in out["error"]["message"] and text == server.good
    assert_serving(server)


# --- 9. small ones -----------------------------------------------------------------------------

def test_edge_values_get_400_or_their_meaning(server):
    assert text_of(request_json(server.port, "/v1/completions", {**GOOD, "stop": ""})) == server.good
    assert text_of(request_json(server.port, "/v1/completions", {**GOOD, "stop": [""]})) == server.good
    escaped = json.dumps({**GOOD, "stop": ["\U0001F600"]}).encode()  # a surrogate pair: text, not an error
    assert b"\\ud83d" in escaped and text_of(request_json(server.port, "/v1/completions", raw=escaped)) == server.good
    for raw, word in [(b'{"prompt": ' + b"[" * 60_000 + b"]" * 60_000 + b"}", "nested"),
                      (b'{"prompt": "abc\\ud800", "max_tokens": 2}', "surrogate"),
                      (b'{"prompt": "abc", "stop": ["\\udfff"], "max_tokens": 2}', "surrogate"),
                      (b'{"prompt": ["ok", "\\uDBFFabc"], "max_tokens": 2}', "surrogate"),
                      (b'{"prompt": "ok", "\\uD800": 1}', "surrogate"),
                      (b'{"prompt": "a", "prompt": "b", "max_tokens": 2}', "twice"),
                      (b'{"context": "a", "context": "b"}', "twice")]:
        path = "/complete" if b"context" in raw else "/v1/completions"
        (status, out), text = beside(server.port, path, raw=raw)
        assert status == 400 and word in out["error"]["message"], out
        assert text == server.good
    assert_serving(server)
