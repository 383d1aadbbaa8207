"""A seeded fuzz of the real server on each engine: 500 requests (100 on the static batcher, whose every new
batch shape compiles) to /v1/completions, /v1/chat/completions and /complete, mixing valid and invalid values of
every field, mangled JSON, streaming and not, some clients hanging up midway, 8 at a time. Every answer is a
clean 2xx/4xx/503 (no 500, no error inside a stream), and afterwards the server is healthy and a greedy
request returns the tokens it returned before."""

import collections
import concurrent.futures
import json
import socket

import numpy as np
import pytest

from test_serve import Running, request
from test_serve_faults import ckpt  # noqa: F401 -- the same sharp tiny GPT-J

REQUESTS = {"continuous": 500, "static": 100}
ALLOWED = {200, 400, 404, 408, 413, 429, 503}
GREEDY = {"prompt": "The fuzz is over", "max_tokens": 12, "temperature": 0}


def text(rng: np.random.Generator) -> str:
    """Random text: ASCII, accents, CJK, emoji, controls, the end-of-text marker."""
    pieces = ["hello", " world", "é", "中文", "😀", "\x00", "\n", "\t", "<|endoftext|>", "  ", "ÿ", "\u200b", "a" * 50]
    return "".join(rng.choice(pieces, int(rng.integers(0, 12))))


def prompt(rng: np.random.Generator):
    ids = lambda n, hi=50257: rng.integers(0, hi, n).tolist()  # noqa: E731
    valid = [lambda: text(rng), lambda: ids(int(rng.integers(1, 100))), lambda: [text(rng) + "x", "y" + text(rng)],
             lambda: [ids(3), ids(5)], lambda: ["x"] * int(rng.integers(1, 5))]
    invalid = [lambda: text(rng) * 30, lambda: "", lambda: [], lambda: [[]], lambda: ids(5, 60000), lambda: [-1, 5],
               lambda: [2**40], lambda: [1.5, 2], lambda: [True], lambda: 7, lambda: None, lambda: {"text": "x"},
               lambda: [[1, 2], "mixed"], lambda: ids(200), lambda: ["x"] * int(rng.integers(60, 80))]
    pick = invalid if rng.random() < 0.15 else valid
    return pick[int(rng.integers(0, len(pick)))]()


FIELDS = {  # name: (valid values, invalid values)
    "max_tokens": ([0, 1, 5, 16, 40, 64, None], [127, 128, 129, 10**9, -1, "5", 5.5, True]),
    "temperature": ([0, 0.0, 0.7, 1, 2], [2.5, -1, "hot", None, 1e308]),
    "top_p": ([0.1, 0.5, 0.95, 1], [0, 1.5, -0.5, "x"]),
    "top_k": ([-1, 0, 1, 40, 50257], [-2, 50258, 2**31, 2**63, 2**70, 3.5]),
    "n": ([1, 2, 4, 16], [0, 17, 1000, -1, "2"]),
    "stop": (["", [""], "\n", ["the", "a"], "é😀", None, ["a" * 1000]], [["x"] * 20, [1]]),
    "seed": ([0, 1, 2**32 - 17, None], [-1, 2**32, 2**64, "7"]),
    "logprobs": ([0, 1, 5, 20, None], [-1, 21, True]),
    "echo": ([True, False], ["yes", 1]),
    "stream": ([True, False], [1]),
    "stream_options": ([{"include_usage": True}], [{"include_usage": "no"}, {"x": 1}]),
    "model": (["fuzz", None], ["other", "", 5]),
    "user": (["someone"], [5]),
    "frequency_penalty": ([0, 0.5, -2, 2], [2.5, "x", None]),
    "presence_penalty": ([0, 1.5, -0.5], [-3, [1]]),
    "repetition_penalty": ([1, 1.3, 0.7], [0, -1, 1e309]),
    "logit_bias": ([{}, {"50256": -100}, {"5": 2.5, "17": -1}, None], [{"x": 1}, {"50257": 1}, {"5": 101}, {"5": "a"}, [1]]),
    "best_of": ([], [3]),
}
CHAT_FIELDS = {
    **{name: values for name, values in FIELDS.items() if name not in ("max_tokens", "logprobs", "echo", "best_of")},
    "max_tokens": ([1, 5, 16, 40, None], [0, 129, -1, "5"]),
    "max_completion_tokens": ([1, 8, None], [0, 10**9]),
    "logprobs": ([True, False], [1, "yes"]),
    "top_logprobs": ([0, 2, 20, None], [21, -1]),
    "add_generation_prompt": ([True, False], ["x"]),
    "echo": ([], [True]),
}
# a template that refuses a role, as real ones do
CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
                 "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def messages(rng: np.random.Generator):
    said = lambda role="user": {"role": role, "content": text(rng)}  # noqa: E731
    valid = [lambda: [said()], lambda: [said("system"), said(), said("assistant"), said()],
             lambda: [{"role": "user", "content": [{"type": "text", "text": text(rng)}] * 2, "name": "x"}],
             lambda: [said("developer"), {"role": "assistant", "content": None}]]
    invalid = [lambda: [], lambda: "hello", lambda: [said("wizard")], lambda: [{"content": "x"}], lambda: [said("tool")],
               lambda: [{"role": "user", "content": 5}], lambda: [{"role": "user", "content": [{"type": "image_url"}]}],
               lambda: [{"role": "user", "content": "x" * 3000}], lambda: [{**said(), "tool_calls": []}], lambda: [None]]
    pick = invalid if rng.random() < 0.2 else valid
    return pick[int(rng.integers(0, len(pick)))]()


COMPLETE_FIELDS = {
    "length": ([1, 8, 64, None], [128, 0, -1, 2**40]), "temp": ([0, 0.5, 1, 2], [3, -1]),
    "top_p": ([0.1, 0.9, 1], [0, 2]), "top_k": ([0, 5, 50257], [2**31, 2**64, -1]), "seed": ([0, 5], [2**32, -1]),
    "tempo": ([], [1]),
}


def draw(rng: np.random.Generator) -> tuple[str, bytes]:
    """A request: its path and body, now and then mangled past valid JSON."""
    kind = rng.random()
    if kind < 0.15:
        path, body = "/complete", {"context": text(rng) if rng.random() < 0.9 else prompt(rng)}
        fields = COMPLETE_FIELDS
    elif kind < 0.35:
        path, body, fields = "/v1/chat/completions", {"messages": messages(rng)}, CHAT_FIELDS
    else:
        path, body = "/v1/completions", {"prompt": prompt(rng)} if rng.random() < 0.95 else {}
        fields = FIELDS
    for name, (valid, invalid) in fields.items():
        if rng.random() < (0.35 if valid else 0.03):
            values = invalid if not valid or rng.random() < 0.12 else valid
            body[name] = values[int(rng.integers(0, len(values)))]
    if rng.random() < 0.8:  # mostly consistent combinations, some not
        if "stream_options" in body:
            body["stream"] = True
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
        if body.get("stream") is True:
            body.pop("logprobs", None)
            body.pop("top_logprobs", None)
        if body.get("max_tokens") == 0:
            body.update(echo=True, stream=False)
            body.pop("stream_options", None)
    if body.get("max_tokens", 0) and body.get("n", 1) in (16, 1000):
        body["max_tokens"] = 8  # (bounded work per request: the fuzz is about answers, not load)
    raw = json.dumps(body).encode()
    mangle = rng.random()
    if mangle < 0.03:
        raw = raw[: int(rng.integers(0, len(raw)))]  # truncated
    elif mangle < 0.05:
        raw = raw[:-1] + b', "prompt": "again"}'  # a duplicate key
    elif mangle < 0.07:
        raw = raw[:-1] + b', "temperature": NaN}'
    elif mangle < 0.09:
        raw = b'{"prompt": "lone \\ud800 surrogate", "max_tokens": 2}'
    elif mangle < 0.10:
        raw = b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    elif mangle < 0.11:
        raw = b"[1, 2, 3]"
    elif mangle < 0.12:
        raw = bytes(rng.integers(0, 256, 64, dtype=np.uint8))  # not text
    return path, raw


def text_of(reply: tuple[int, str]) -> str:
    assert reply[0] == 200, reply
    return json.loads(reply[1])["choices"][0]["text"]


def exchange(port: int, path: str, raw: bytes, leave: str) -> tuple[int, bytes]:
    """Send one request; read the whole answer, or hang up ('now': after sending, 'midway': after its start)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        if leave == "now":
            return 0, b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if leave == "midway" and b"\r\n\r\n" in out:
                break
    return (int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else 0), out


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_fuzz(ckpt, engine, tmp_path):  # noqa: F811
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    srv = Running(ckpt, "--engine", engine, "--served-model-name", "fuzz", "--chat-template", str(tmp_path / "chat.jinja"))
    try:
        before = request(srv.port, "/v1/completions", GREEDY)
        rng = np.random.default_rng(0 if engine == "continuous" else 1)
        cases = [(*draw(rng), str(rng.choice(["read"] * 8 + ["now", "midway"]))) for _ in range(REQUESTS[engine])]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda case: exchange(srv.port, *case), cases))
        statuses, refusals, chats = collections.Counter(), collections.Counter(), collections.Counter()
        for (path, raw, leave), (status, out) in zip(cases, answers):
            if leave != "read":
                continue
            statuses[status] += 1
            chats[status] += path == "/v1/chat/completions"
            assert status in ALLOWED, (path, raw[:300], out[-600:])
            assert b'"server_error"' not in out, (path, raw[:300], out[-600:])  # (also inside a stream)
            if status == 400:
                refusals[json.loads(out.partition(b"\r\n\r\n")[2])["error"]["message"][:40]] += 1
        assert chats[200] and chats[400], chats
        read = sum(statuses.values())  # both kinds were exercised
        assert statuses[200] > read / 5 and statuses[400] > read / 5, (statuses, refusals.most_common(12))
        assert request(srv.port, "/health")[0] == 200
        assert text_of(request(srv.port, "/v1/completions", GREEDY)) == text_of(before)
    finally:
        assert srv.stop() == 0
