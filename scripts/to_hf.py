#!/usr/bin/env python
"""Export an mtj checkpoint to a Hugging Face directory that transformers loads."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtj.convert import export_hf  # noqa: E402
from mtj.cli import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, help="a model_dir (latest step) or one step_N directory")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args()
    print(f"wrote {export_hf(args.ckpt, args.out, args.dtype)}")


if __name__ == "__main__":
    run(main)
