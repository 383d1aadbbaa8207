#!/usr/bin/env python
"""Train or fine-tune a model on the device mesh; rerunning the same command resumes."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtj import distributed  # noqa: E402
from mtj.config import load_config  # noqa: E402
from mtj.train import train  # noqa: E402
from mtj.cli import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="JSON config (SPEC §2)")
    ap.add_argument("--tune-model-path", help="start from this checkpoint's weights at step 0 (fine-tuning)")
    ap.add_argument("--fresh-opt", action="store_true", help="with --tune-model-path: drop its optimizer state")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(ap)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()
    distributed.initialize(args)
    cfg = load_config(args.config, args.overrides)
    train(cfg, tune_model_path=args.tune_model_path, fresh_opt=args.fresh_opt, progress=not args.no_progress)


if __name__ == "__main__":
    run(main)
