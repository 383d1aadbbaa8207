"""Convert a Hugging Face GPT-J / GPT-Neo / GPT-NeoX directory into an mtj checkpoint."""


from mtj.config import parse_overrides
from mtj.workflows import import_hf
from mtj.cli import parser, run


def main() -> None:
    ap = parser("mtj-from-hf", __doc__)
    ap.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    ap.add_argument("--out", required=True, help="output checkpoint directory (step_0 is written inside)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="also read pytorch_model.bin (a pickle: only for files you trust)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. tokenizer=gpt2")
    args = ap.parse_args()
    step_dir = import_hf(args.hf, args.out, allow_pickle=args.allow_pickle, **parse_overrides(args.overrides))
    print(f"wrote {step_dir}")


def cli() -> None:
    """`mtj-from-hf` (and `python scripts/from_hf.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
