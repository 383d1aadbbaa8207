#!/usr/bin/env python
"""Scoring through the server (`echo` + `logprobs`, `max_tokens` 0: what lm-eval's loglikelihood asks):
serve.py of this checkout vs serve.py of a baseline revision, in one run, on the serve_load benchmark
model (4 layers, d_model 256, GPT-2 vocabulary, context 512).

40 requests with random prompt lengths (8-500 tokens) are sent one after another, twice: the first pass
includes whatever each server compiles for new lengths, the second is compiled. Reported: seconds per
pass for each server and the ratios. Run it inside ../shared/bin/offline.
"""

import argparse
import json
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import REPO, revision_tree
from serve_load import benchmark_model, cpu_name, free_port, start_server


def passes(serve_py: Path, ckpt: Path, prompts: list[list[int]], logprobs: int) -> tuple[float, float]:
    port = free_port()
    proc = start_server(serve_py, ckpt, port, 8, [])
    try:
        def ask(ids: list[int]) -> None:
            body = json.dumps({"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": logprobs}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=600).read()

        times = []
        for _ in range(2):
            start = time.perf_counter()
            for ids in prompts:
                ask(ids)
            times.append(time.perf_counter() - start)
        return times[0], times[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", default="336d64c", help="git revision whose serve.py is the baseline "
                    "(default: the commit before scoring was bucketed and moved to the device)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, int(n)).tolist() for n in rng.integers(8, 501, args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = benchmark_model(tmp / "model", args)
        with revision_tree(args.baseline, tmp / "baseline") as base:
            baseline = passes(base / "scripts" / "serve.py", ckpt, prompts, args.logprobs)
            ours = passes(REPO / "scripts" / "serve.py", ckpt, prompts, args.logprobs)
    print(f"{cpu_name()}; {args.requests} echo+logprobs={args.logprobs} requests, prompts 8-500 tokens, "
          f"{args.layers} layers d_model {args.d_model}")
    print(f"{'server':<28}{'first pass':>12}{'compiled':>12}")
    print(f"{'baseline (' + args.baseline + ')':<28}{baseline[0]:>11.2f}s{baseline[1]:>11.2f}s")
    print(f"{'this checkout':<28}{ours[0]:>11.2f}s{ours[1]:>11.2f}s")
    print(f"ratios (baseline / this): first pass {baseline[0] / ours[0]:.2f}x, compiled {baseline[1] / ours[1]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
