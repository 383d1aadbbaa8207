"""Train or fine-tune a model on the device mesh; rerunning the same command resumes."""

import signal

from mtj import distributed
from mtj.config import load_config
from mtj.train import TrainHooks, train
from mtj.cli import parser, run


def main(hooks: TrainHooks = TrainHooks()) -> None:
    ap = parser("mtj-train", __doc__)
    ap.add_argument("--config", required=True, help="JSON config (keys: docs/config.md)")
    ap.add_argument("--tune-model-path", help="start from this checkpoint's weights at step 0 (fine-tuning)")
    ap.add_argument("--fresh-opt", action="store_true", help="with --tune-model-path: drop its optimizer state")
    ap.add_argument("--takeover", action="store_true",
                    help="take model_dir's writer lock from the run that holds it (one that is gone, e.g. its VM deleted)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(ap)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args()
    if args.fresh_opt and not args.tune_model_path:
        ap.error("--fresh-opt applies to --tune-model-path (a resumed run keeps its optimizer state)")
    distributed.initialize(args)
    cfg = load_config(args.config, args.overrides)
    train(cfg, tune_model_path=args.tune_model_path, fresh_opt=args.fresh_opt, progress=not args.no_progress,
          takeover=args.takeover, hooks=hooks)
    # The run is saved and only exiting is left: a late SIGTERM/SIGINT is ignored (Python's finalization puts
    # back the default handlers of those it handled, which would kill the process)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def cli() -> None:
    """`mtj-train` (and `python scripts/train.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
