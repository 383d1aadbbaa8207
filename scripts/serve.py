#!/usr/bin/env python
"""Serve a checkpoint over HTTP: POST /complete, POST /v1/completions (OpenAI-style, SSE streaming), GET /health."""

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mtj  # noqa: E402
from mtj import distributed  # noqa: E402
from mtj.paths import user_path  # noqa: E402
from mtj.serve import Server  # noqa: E402
from mtj.cli import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, help="model_dir, step directory, or HF model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    ap.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 503")
    ap.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    ap.add_argument("--mp", type=int, default=1, help="tensor-parallel devices")
    distributed.add_arguments(ap)
    args = ap.parse_args()
    distributed.initialize(args)
    lm = mtj.load(args.ckpt, mp=args.mp)
    server = Server(lm, args.host, args.port, args.max_batch, args.max_queue, args.max_tokens,
                    model_name=user_path(args.ckpt).name)
    lm.generate_tokens([[0]], max_new_tokens=1, temperature=0)  # compile the common shapes before taking traffic

    # Graceful: stop accepting, finish queued work, then exit. shutdown() runs in a thread
    # (it waits for serve_forever, which runs in this one), and the interpreter must not
    # exit before it is done: tearing JAX down under a running batcher aborts the process.
    stopper = threading.Thread(target=server.shutdown)

    def stop(signum, frame):
        if stopper.ident is None:  # a second signal changes nothing
            stopper.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {args.ckpt} on http://{args.host}:{server.port}", flush=True)
    server.serve_forever()
    stopper.join()
    print("stopped", flush=True)


if __name__ == "__main__":
    run(main)
