"""The HTTP server, running for real in its own process, driven by a real HTTP client."""

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, hf_gptj
from mtj.tokenizer import load_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str, body=None, raw: bytes | None = None, timeout: float = 120):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Running:
    def __init__(self, ckpt, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--ckpt", str(ckpt),
                                      "--port", str(self.port), *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            try:
                if request(self.port, "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        if code != 0:
            print(self.proc.stdout.read()[-5000:])  # pytest shows it with the failure
        return code


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = hf_gptj(tmp_path_factory.mktemp("srv") / "hf", vocab_size=50257, n_positions=128, n_embd=32, n_head=4,
                   rotary_dim=4, bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Running(ckpt, "--max-batch", "8", "--max-queue", "64")
    yield srv
    assert srv.stop() == 0  # SIGTERM: a graceful exit
    assert "stopped" in srv.proc.stdout.read()


def test_endpoints(server):
    status, body = request(server.port, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = request(server.port, "/complete", {"context": "Hello", "temp": 0, "length": 8})
    assert status == 200 and isinstance(json.loads(body)["completion"], str)
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


def test_concurrent_requests_are_batched_and_correct(server):
    prompts = [f"Request number {i}:" for i in range(32)]
    expected = {p: json.loads(request(server.port, "/v1/completions", {"prompt": p, "max_tokens": 6,
                                                                       "temperature": 0})[1])["choices"][0]["text"]
                for p in prompts[:4]}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: request(server.port, "/v1/completions",
                                                  {"prompt": p, "max_tokens": 6, "temperature": 0}), prompts))
    assert all(status == 200 for status, _ in results)
    for p, (_, body) in zip(prompts, results):
        text = json.loads(body)["choices"][0]["text"]
        if p in expected:
            assert text == expected[p]


def test_bad_requests_get_400_and_server_keeps_serving(server):
    assert request(server.port, "/v1/completions", raw=b"{not json")[0] == 400
    assert request(server.port, "/v1/completions", {"prompt": 3})[0] == 400
    assert request(server.port, "/v1/completions", {"prompt": "x", "temperature": "hot"})[0] == 400
    status, body = request(server.port, "/v1/completions", {"prompt": "word " * 200, "max_tokens": 4})
    assert status == 400 and "context" in json.loads(body)["error"]["message"]
    assert request(server.port, "/complete", {"context": None})[0] == 400
    assert request(server.port, "/nope", {})[0] == 404
    assert request(server.port, "/complete", {"context": "still here", "length": 2, "temp": 0})[0] == 200


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
    srv = Running(ckpt, "--max-batch", "1")
    body = {"prompt": "Before the end", "max_tokens": 100, "temperature": 1.0}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(request, srv.port, "/v1/completions", body) for _ in range(3)]
        time.sleep(1.0)  # accepted: one decoding, two queued
        assert srv.stop() == 0
        for reply in replies:
            status, text = reply.result()
            assert status == 200 and len(json.loads(text)["choices"][0]["text"]) > 0
    assert "stopped" in srv.proc.stdout.read()
