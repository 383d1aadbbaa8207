#!/usr/bin/env python
"""Zero-shot evaluation of a checkpoint (ours or a Hugging Face directory), scored as lm-evaluation-harness does.

Tasks: lambada (= lambada_openai; reads $MTJ_ASSETS/eval/lambada_test.jsonl): accuracy and perplexity.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mtj  # noqa: E402
from mtj import distributed  # noqa: E402
from mtj.evaluate import KNOWN_TASKS, TASKS, evaluate  # noqa: E402
from mtj.cli import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, help="model_dir, step directory, or HF model directory")
    ap.add_argument("--tasks", required=True, help=f"comma-separated, of: {KNOWN_TASKS}")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mp", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--json", action="store_true", help="one JSON object per task and line")
    distributed.add_arguments(ap)
    args = ap.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        ap.error(f"unknown task(s) {unknown or args.tasks!r}; known tasks: {KNOWN_TASKS}")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    distributed.initialize(args)
    lm = mtj.load(args.ckpt, mp=args.mp)
    for task in tasks:
        result = evaluate(lm, task, args.limit, args.batch_size, progress=not args.json)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{task}: acc {result['acc']:.4f}, ppl {result['ppl']:.3f} ({result['examples']} examples)",
                  flush=True)


if __name__ == "__main__":
    run(main)
