#!/usr/bin/env python
"""Write a params-only copy of a checkpoint in bf16 or fp16 (no optimizer state), for sampling and serving."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtj.checkpoint import slim  # noqa: E402
from mtj.cli import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, help="a model_dir (latest step) or one step_N directory")
    ap.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args()
    print(f"wrote {slim(args.ckpt, args.out, args.dtype)}")


if __name__ == "__main__":
    run(main)
