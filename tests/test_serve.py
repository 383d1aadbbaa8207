"""The HTTP server, running for real in its own process, driven by a real HTTP client."""

import concurrent.futures
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import mtj
from conftest import REPO, SHARP, hf_gptj
from mtj.tokenizer import load_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, body=None, raw: bytes | None = None, timeout: float = 120, headers=None,
            tls=None):
    """(status, body); `tls`: an ssl.SSLContext to speak https with."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=tls) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Running:
    """serve.py in its own process; its output is read as it comes (as a terminal or a log collector would)."""

    def __init__(self, ckpt, *args, env=None, tls=None):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--ckpt", str(ckpt),
                                      "--port", str(self.port), *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.output())
            try:
                if request(self.port, "/health", timeout=2, tls=tls)[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def output(self) -> str:
        """What it printed so far (all of it once it has exited)."""
        if self.proc.poll() is not None:
            self.reader.join(timeout=30)
        return "".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        if code != 0:
            print(self.output()[-5000:])  # pytest shows it with the failure
        return code


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = hf_gptj(tmp_path_factory.mktemp("srv") / "hf", vocab_size=50257, n_positions=128, n_embd=32, n_head=4,
                   rotary_dim=4, bos_token_id=50256, eos_token_id=50256, **SHARP)  # sharp: greedy ties are rare
    load_tokenizer("gpt2").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    """The served model, loaded here: what each request must get when decoded alone."""
    return mtj.load(ckpt)


def alone(lm, prompt: str, max_new: int) -> str:
    return lm.decode_new(lm.generate_tokens([lm.tokenizer.encode(prompt)], max_new, temperature=0)[0])


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Running(ckpt, "--max-batch", "8", "--max-queue", "64", "--engine", "static")  # continuous: test_openai
    yield srv
    assert srv.stop() == 0  # SIGTERM: a graceful exit
    assert "stopped" in srv.output()


def test_endpoints(server, lm, ckpt):
    status, body = request(server.port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = request(server.port, "/v1/models")  # no --served-model-name: the checkpoint directory's name
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [ckpt.name]
    status, body = request(server.port, "/complete", {"context": "Hello", "temp": 0, "length": 8})
    assert status == 200 and json.loads(body)["completion"] == alone(lm, "Hello", 8)
    # sampled: random unless seeded, as /v1/completions
    sampled = [json.loads(request(server.port, "/complete", {"context": "Hello", "temp": 2, "length": 16, **seed})[1])
               ["completion"] for seed in ({}, {}, {"seed": 7}, {"seed": 7})]
    assert sampled[0] != sampled[1] and sampled[2] == sampled[3]
    status, body = request(server.port, "/v1/completions",
                           {"prompt": ["Hello", "The king"], "max_tokens": 8, "temperature": 0, "n": 2})
    out = json.loads(body)
    assert status == 200 and out["object"] == "text_completion" and len(out["choices"]) == 4
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy: n samples agree
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_matches_plain(server):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    plain = json.loads(request(server.port, "/v1/completions", body)[1])["choices"][0]["text"]
    status, raw = request(server.port, "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_are_batched_and_correct(server, lm):
    prompts = [f"Request number {i}:" + " more" * (i % 5) for i in range(32)]  # lengths differ: rows are padded
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: request(server.port, "/v1/completions",
                                                  {"prompt": p, "max_tokens": 6, "temperature": 0}), prompts))
    assert [status for status, _ in results] == [200] * 32
    assert [json.loads(body)["choices"][0]["text"] for _, body in results] == [alone(lm, p, 6) for p in prompts]
    assert json.loads(request(server.port, "/health")[1])["most_rows_decoded_together"] > 1  # they were batched


def test_bad_requests_get_400_and_server_keeps_serving(server):
    assert request(server.port, "/v1/completions", raw=b"{not json")[0] == 400
    assert request(server.port, "/v1/completions", {"prompt": 3})[0] == 400
    assert request(server.port, "/v1/completions", {"prompt": "x", "temperature": "hot"})[0] == 400
    status, body = request(server.port, "/v1/completions", {"prompt": "word " * 200, "max_tokens": 4})
    assert status == 400 and "context" in json.loads(body)["error"]["message"]
    assert request(server.port, "/complete", {"context": None})[0] == 400
    assert request(server.port, "/nope", {})[0] == 404
    assert request(server.port, "/complete", {"context": "still here", "length": 2, "temp": 0})[0] == 200


def test_a_log_line_per_request_without_its_text(ckpt):
    srv = Running(ckpt, "--max-batch", "2")
    try:
        assert request(srv.port, "/complete", {"context": "Secret words", "temp": 0, "length": 3})[0] == 200
        assert request(srv.port, "/v1/completions", {"prompt": ["Secret", "words"], "max_tokens": 2})[0] == 200
        assert request(srv.port, "/v1/completions", {"prompt": 3})[0] == 400
    finally:
        assert srv.stop() == 0
    out = srv.output()
    assert "Secret" not in out and "words" not in out
    lines = [line.split(" ", 2)[2] for line in out.splitlines() if " 127.0.0.1 " in line]  # after the time stamp
    assert len(lines) == 3, out[-3000:]
    assert re.fullmatch(r"127\.0\.0\.1 POST /complete 200 rows=1 prompt_tokens=2 new_tokens=3 \d+\.\d{3}s", lines[0])
    assert re.fullmatch(r"127\.0\.0\.1 POST /v1/completions 200 rows=2 prompt_tokens=2 new_tokens=4 \d+\.\d{3}s",
                        lines[1])
    assert lines[2].startswith("127.0.0.1 POST /v1/completions 400 rows=0 prompt_tokens=0 new_tokens=0 ")


def test_an_unread_output_does_not_stop_the_server(ckpt):
    """The request log must not block the server when nobody reads its output (a full pipe, a stalled terminal)."""
    import fcntl

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--ckpt", str(ckpt), "--port",
                             str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fcntl.fcntl(proc.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: a pipe of 4 KiB, full after ~40 lines
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline
            try:
                if request(port, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        for _ in range(200):  # each answered (400) and logged; nobody reads the log
            assert request(port, "/v1/completions", {"prompt": 3}, timeout=10)[0] == 400
        assert request(port, "/complete", {"context": "still", "length": 2, "temp": 0}, timeout=60)[0] == 200
    finally:
        proc.kill()
        proc.wait()


def test_overload_gets_503(ckpt):
    srv = Running(ckpt, "--max-batch", "1", "--max-queue", "2")
    try:
        body = {"prompt": "Load test", "max_tokens": 100, "temperature": 1.0}
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = [s for s, _ in pool.map(lambda _: request(srv.port, "/v1/completions", body), range(12))]
        assert 503 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 503}
        assert request(srv.port, "/v1/completions", {"prompt": "after", "max_tokens": 2})[0] == 200
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_the_work_in_flight(ckpt):
    """SIGTERM while a stream is midway and another request waits in the queue: both are answered in full."""
    srv = Running(ckpt, "--max-batch", "1")
    stream = json.dumps({"prompt": "Before the end", "max_tokens": 100, "temperature": 1.0, "n": 8, "stream": True,
                         "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=120) as s, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        s.sendall(post("/v1/completions", stream, f"Content-Length: {len(stream)}\r\n"))
        seen = b""
        while b"data: " not in seen:
            seen += s.recv(65536)
        waiting = pool.submit(request, srv.port, "/v1/completions", {"prompt": "Queued", "max_tokens": 50})
        while json.loads(request(srv.port, "/health")[1])["queued"] < 8:  # 7 of the stream's rows and this one
            time.sleep(0.01)
        assert b"[DONE]" not in seen  # the stream is midway
        srv.proc.send_signal(signal.SIGTERM)
        while chunk := s.recv(65536):
            seen += chunk
        status, text = waiting.result()
    assert status == 200 and json.loads(text)["choices"][0]["text"]
    events = [json.loads(e.split("\n\n")[0]) for e in seen.decode().split("data: ")[1:] if not e.startswith("[DONE]")]
    assert b"data: [DONE]" in seen and sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"]) \
        == list(range(8))
    assert srv.proc.wait(timeout=60) == 0 and "stopped" in srv.output()


# --- the audit of the HTTP front: each finding, reproduced ------------------------------------

def raw_http(port: int, data: bytes, timeout: float = 30, shutdown_write: bool = False) -> bytes:
    """Send raw bytes, return what the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shutdown_write:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except socket.timeout:
            pass
        return out


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n").encode() + body


def test_bad_values_in_one_request_do_not_fail_its_neighbours(server):
    good = {"prompt": "A neighbour", "max_tokens": 6, "temperature": 0}
    expected = json.loads(request(server.port, "/v1/completions", good)[1])["choices"][0]["text"]
    bad = [{"prompt": "x", "seed": 2**32}, {"prompt": "x", "top_k": 2**31}, {"prompt": "x", "top_p": 0},
           {"prompt": "x", "seed": 2**32 - 1, "n": 2}, {"prompt": "x", "logprobs": 99}, {"prompt": "x", "n": 1000}]
    for _ in range(3):  # rounds in which the bad requests arrive together with a good one
        with concurrent.futures.ThreadPoolExecutor(len(bad) + 1) as pool:
            replies = list(pool.map(lambda b: request(server.port, "/v1/completions", b), [good, *bad]))
        assert replies[0][0] == 200 and json.loads(replies[0][1])["choices"][0]["text"] == expected
        for body, (status, text) in zip(bad, replies[1:]):
            assert status == 400, (body, status, text)
            assert len(text) < 1000  # the message does not echo huge values
    for raw in [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}']:
        status, text = request(server.port, "/v1/completions", raw=raw)
        assert status == 400 and "not a number" in text
    assert request(server.port, "/complete", {"context": "x", "temp": 5})[0] == 400
    assert request(server.port, "/complete", {"context": "x", "length": 2, "temp": 0, "tempo": 1})[0] == 400


def test_a_huge_list_of_prompts_is_refused_before_tokenizing(server):
    start = time.monotonic()
    status, text = request(server.port, "/v1/completions", {"prompt": ["one more prompt"] * 200_000, "max_tokens": 1})
    assert status == 400 and "rows" in text and time.monotonic() - start < 5


def test_http_framing_faults_get_clean_answers(ckpt):
    srv = Running(ckpt, "--max-body-bytes", "2000", "--body-timeout", "5", "--max-connections", "301",
                  "--max-connections-per-client", "400")
    try:
        body = json.dumps({"prompt": "Framing", "max_tokens": 2, "temperature": 0}).encode()
        assert status_of(raw_http(srv.port, post("/v1/completions", body, f"Content-Length: {len(body)}\r\n"))) == 200
        # Content-Length absent, negative, not a number, larger than the body
        assert status_of(raw_http(srv.port, post("/v1/completions", b""))) == 400
        assert status_of(raw_http(srv.port, post("/v1/completions", body, "Content-Length: -5\r\n"))) == 400
        assert status_of(raw_http(srv.port, post("/v1/completions", body, "Content-Length: ten\r\n"))) == 400
        start = time.monotonic()
        assert status_of(raw_http(srv.port, post("/v1/completions", body, f"Content-Length: {len(body) + 50}\r\n"))) == 408
        assert time.monotonic() - start < 10
        # a chunked body, then a second request on the same connection: no desync
        chunked = post("/v1/completions", f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
                       "Transfer-Encoding: chunked\r\n")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            for _ in range(2):
                s.sendall(chunked)
                out = b""
                while not (b"\r\n\r\n" in out and _complete(out)):
                    out += s.recv(65536)
                assert status_of(out) == 200 and b'"choices"' in out
        # bodies over the limit: declared or streamed
        big = json.dumps({"prompt": "x" * 5000}).encode()
        assert status_of(raw_http(srv.port, post("/v1/completions", big, f"Content-Length: {len(big)}\r\n"))) == 413
        streamed = post("/v1/completions", f"{len(big):x}\r\n".encode() + big + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked\r\n")
        assert status_of(raw_http(srv.port, streamed)) == 413
        # 300 half-sent bodies hold no threads; past the connection cap, with every connection busy, a new one
        # gets 503, not a hang (idle ones would make room: test_faults_beside_valid_requests)
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(300)]
        for s in held:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        assert request(srv.port, "/v1/completions", {"prompt": "Still", "max_tokens": 2, "temperature": 0})[0] == 200
        held.append(socket.create_connection(("127.0.0.1", srv.port)))
        held[-1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        status, _ = request(srv.port, "/v1/completions", {"prompt": "Full", "max_tokens": 2}, timeout=10)
        assert status == 503
        for s in held:
            s.close()
        time.sleep(3)  # the server notices the closed connections
        assert request(srv.port, "/v1/completions", {"prompt": "After", "max_tokens": 2, "temperature": 0})[0] == 200
        # a client that goes away mid-stream: the server keeps serving
        stream = json.dumps({"prompt": "Gone", "max_tokens": 60, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            s.sendall(post("/v1/completions", stream, f"Content-Length: {len(stream)}\r\n"))
            seen = b""
            for _ in range(100):
                seen += s.recv(65536)
                if b"data: " in seen:
                    break
            assert b"data: " in seen
        assert request(srv.port, "/health")[0] == 200
        assert request(srv.port, "/v1/completions", {"prompt": "Next", "max_tokens": 2, "temperature": 0})[0] == 200
    finally:
        assert srv.stop() == 0


def test_health_reports_a_stopped_engine(ckpt):
    from starlette.testclient import TestClient

    import mtj
    from mtj.serve import Server

    server = Server(mtj.load(ckpt), port=0)
    client = TestClient(server.uvicorn.config.app)
    assert client.get("/health").status_code == 200
    server.engine.stop()  # the engine thread is gone
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 503


def test_no_cors_headers_unless_origins_are_allowed(server):
    """CORS is off by default: a browser page from another origin cannot read the answers (test_access: on)."""
    response = raw_http(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nOrigin: https://page.example\r\n"
                        b"Connection: close\r\n\r\n")
    assert status_of(response) == 200 and b"access-control" not in response.lower()
