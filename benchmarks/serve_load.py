#!/usr/bin/env python
"""Serving under load: serve.py of this checkout (its continuous engine) vs serve.py of a baseline
revision (default: the commit before continuous batching, whose only engine is the static batcher;
`--baseline HEAD --baseline-args "--engine static"` compares with this checkout's static batcher),
in one run.

64 streaming requests arrive at Poisson times against each server in turn, on the same random GPT-J
(the benchmark model: by default 4 layers, d_model 256, GPT-2 tokenizer). `--workload mixed`: prompt
lengths 8-200 tokens and max_tokens 8-256 drawn from a fixed seed; `--workload shared-prefix` (a
5-shot evaluation): every prompt is one 1,024-token header and a 16-48-token question, max_tokens 8-32;
each server then also answers a time-to-first-token probe: a request with a header it has not seen
(cold) and one sharing that header (warm), 5 times; `--workload grounded` (for --speculate): a 500-token
passage, "rewritten:" and the passage's first 8 tokens, max_tokens 128-256. Reported per server: completed tokens/s (tokens
of all completions over the time from the first arrival to the last answer), time to first token and
request latency (p50, p99); then the ratios. Run it inside ../shared/bin/offline. The prefix cache:

    benchmarks/serve_load.py --workload shared-prefix --baseline HEAD --baseline-args "" --args "--prefix-cache-gb 1"
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import REPO, revision_tree

sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_model(path: Path, args: argparse.Namespace) -> Path:
    import torch
    import transformers

    from mtj.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(vocab_size=50257, n_positions=args.n_positions, n_embd=args.d_model, n_layer=args.layers,
                                  n_head=args.heads, rotary_dim=args.d_model // args.heads // 2,
                                  bos_token_id=50256, eos_token_id=50256)
    transformers.GPTJForCausalLM(cfg).eval().save_pretrained(path)
    load_tokenizer("gpt2").save_pretrained(path)
    return path


def corpus_tokens() -> tuple:
    from mtj.tokenizer import assets_dir, load_tokenizer

    tok = load_tokenizer("gpt2")
    return tok, tok.encode((assets_dir() / "text" / "tinyshakespeare.txt").read_text()[:200_000])


HEADER = 1024  # the shared-prefix workload's header, in tokens
GROUNDED = 500  # the grounded workload's passage, in tokens


def workload(n: int, rate: float, seed: int, kind: str) -> list[dict]:
    """Requests with their arrival offsets: prompts are passages of the bundled corpus."""
    tok, corpus = corpus_tokens()
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    out = []
    for i in range(n):
        if kind == "mixed":
            length, new, head = int(rng.integers(8, 201)), int(rng.integers(8, 257)), []
        elif kind == "shared-prefix":  # the header is the corpus's first HEADER tokens
            length, new, head = int(rng.integers(16, 49)), int(rng.integers(8, 33)), corpus[:HEADER]
        else:  # grounded: a passage to rewrite, and the rewrite's first tokens
            length, new, head = GROUNDED, int(rng.integers(128, 257)), []
        start = int(rng.integers(0 if kind == "mixed" else HEADER, len(corpus) - length))
        passage = corpus[start:start + length]
        if kind == "grounded":
            passage = passage + tok.encode("\n\nThe passage above, rewritten:\n") + passage[:8]
        out.append({"at": float(arrivals[i] - arrivals[0]), "prompt": tok.decode(head + passage), "max_tokens": new})
    return out


def ttft_probe(port: int, rounds: int = 5) -> tuple[float, float]:
    """Median time to first token of a request whose HEADER-token header the server has not seen, and of the
    next one sharing that header (other headers than the workload's)."""
    tok, corpus = corpus_tokens()
    cold, warm = [], []
    for r in range(rounds):
        header = corpus[(r + 2) * HEADER:(r + 3) * HEADER]
        for times, question in ((cold, " Who speaks first?"), (warm, " Who speaks last?")):
            result = {}
            one_request(port, {"prompt": tok.decode(header) + question, "max_tokens": 1}, r, result)
            times.append(result["ttft"])
    return float(np.median(cold)), float(np.median(warm))


def start_server(serve_py: Path, ckpt: Path, port: int, max_batch: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(serve_py), "--ckpt", str(ckpt), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256", *extra],
                            cwd=serve_py.parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(serve_py.parent.parent)})  # that revision's mtj
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{serve_py} exited with {proc.returncode}")
            time.sleep(0.5)
    raise TimeoutError(f"{serve_py} did not start")


def one_request(port: int, req: dict, seed: int, result: dict) -> None:
    body = json.dumps({"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0.8, "top_p": 0.95,
                       "seed": seed, "stream": True}).encode()
    sent = time.perf_counter()
    http = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"})
    text, first = "", None
    with urllib.request.urlopen(http, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if piece and first is None:
                first = time.perf_counter() - sent
            text += piece
    result.update(ttft=first if first is not None else time.perf_counter() - sent,
                  latency=time.perf_counter() - sent, text=text, done=time.perf_counter())


def run_load(port: int, requests: list[dict]) -> dict:
    from mtj.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    results = [{} for _ in requests]
    begin = time.perf_counter()

    def client(i: int) -> None:
        time.sleep(max(0.0, begin + requests[i]["at"] - time.perf_counter()))
        one_request(port, requests[i], i, results[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(len(tok.encode(r["text"])) for r in results)  # re-encoded: the streams carry text
    span = max(r["done"] for r in results) - begin
    ttft, latency = np.array([r["ttft"] for r in results]), np.array([r["latency"] for r in results])
    return {"tokens_per_s": tokens / span, "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "latency_p50": np.percentile(latency, 50), "latency_p99": np.percentile(latency, 99), "tokens": tokens}


def measure(serve_py: Path, ckpt: Path, requests: list[dict], max_batch: int, extra: list[str], probe: bool) -> dict:
    port = free_port()
    proc = start_server(serve_py, ckpt, port, max_batch, extra)
    try:
        warm = [dict(r, at=0.0) for r in requests[:max_batch]]  # compile the shapes the load will use
        run_load(port, warm)
        result = run_load(port, requests)
        if probe:
            result["ttft_cold"], result["ttft_warm"] = ttft_probe(port)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", default="dd37239~1", help="git revision whose serve.py is the baseline "
                    "(default: the commit before continuous batching)")
    ap.add_argument("--args", default="--engine continuous", help="serve.py options of this checkout's side")
    ap.add_argument("--baseline-args", default="", help="serve.py options of the baseline's side")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--workload", choices=["mixed", "shared-prefix", "grounded"], default="mixed")
    ap.add_argument("--n-positions", type=int, default=None, help="the model's context (default: 512; shared-prefix 2048)")
    args = ap.parse_args()
    args.n_positions = args.n_positions or {"mixed": 512, "shared-prefix": 2 * HEADER, "grounded": 1024}[args.workload]
    requests = workload(args.requests, args.rate, args.seed, args.workload)
    probe = args.workload == "shared-prefix"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = benchmark_model(tmp / "model", args)
        with revision_tree(args.baseline, tmp / "baseline") as base:
            sides = {f"baseline ({args.baseline})": measure(base / "scripts" / "serve.py", ckpt, requests, args.max_batch,
                                                            args.baseline_args.split(), probe),
                     f"this checkout {args.args}": measure(REPO / "scripts" / "serve.py", ckpt, requests, args.max_batch,
                                                           args.args.split(), probe)}
    print(f"{cpu_name()}, {os.cpu_count()} cores; {args.workload} workload: {args.requests} requests at {args.rate}/s, "
          f"max_batch {args.max_batch}; model {args.layers} layers, d_model {args.d_model}, context {args.n_positions}")
    print(f"{'server':<40} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8}")
    for name, r in sides.items():
        print(f"{name:<40} {r['tokens_per_s']:9.1f} {r['ttft_p50']:8.2f}s {r['ttft_p99']:8.2f}s "
              f"{r['latency_p50']:7.2f}s {r['latency_p99']:7.2f}s")
    (b, base_r), (_, new) = sides.items()
    print(f"ratios (this / baseline): tokens/s {new['tokens_per_s'] / base_r['tokens_per_s']:.2f}x, "
          f"TTFT p50 {new['ttft_p50'] / base_r['ttft_p50']:.2f}x, latency p50 {new['latency_p50'] / base_r['latency_p50']:.2f}x, "
          f"latency p99 {new['latency_p99'] / base_r['latency_p99']:.2f}x")
    for name, r in sides.items():
        if "ttft_cold" in r:
            print(f"{name}: time to first token, {HEADER}-token header unseen {r['ttft_cold']:.3f}s, shared "
                  f"{r['ttft_warm']:.3f}s (shared / unseen {r['ttft_warm'] / r['ttft_cold']:.3f})")


if __name__ == "__main__":
    main()
