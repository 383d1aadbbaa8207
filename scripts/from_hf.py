#!/usr/bin/env python
"""Convert a Hugging Face GPT-J / GPT-Neo / GPT-NeoX directory into an mtj checkpoint."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtj.config import parse_overrides  # noqa: E402
from mtj.convert import import_hf  # noqa: E402
from mtj.cli import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    ap.add_argument("--out", required=True, help="output checkpoint directory (step_0 is written inside)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="also read pytorch_model.bin (a pickle: only for files you trust)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. tokenizer=gpt2")
    args = ap.parse_args()
    step_dir = import_hf(args.hf, args.out, allow_pickle=args.allow_pickle, **parse_overrides(args.overrides))
    print(f"wrote {step_dir}")


if __name__ == "__main__":
    run(main)
