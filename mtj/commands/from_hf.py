"""Convert a Hugging Face GPT-J / GPT-Neo / GPT-NeoX directory into an mtj checkpoint."""


from mtj.config import parse_overrides
from mtj.workflows import import_hf, import_peft
from mtj.cli import parser, run


def main() -> None:
    ap = parser("mtj-from-hf", __doc__)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="HF model directory (config.json + *.safetensors)")
    source.add_argument("--peft", help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors); "
                        "with --base, the mtj checkpoint of the model it adapts (mtj-from-hf --hf of that model)")
    ap.add_argument("--base", help="with --peft: the mtj checkpoint of the adapters' base model")
    ap.add_argument("--out", required=True, help="output checkpoint directory (step_0 is written inside)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="also read pytorch_model.bin (a pickle: only for files you trust)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. tokenizer=gpt2")
    args = ap.parse_args()
    if args.peft:
        if not args.base:
            ap.error("--peft needs --base CKPT: the mtj checkpoint of the adapters' base model (convert it with "
                     "mtj-from-hf --hf BASE_DIR --out CKPT first)")
        print(f"wrote {import_peft(args.peft, args.base, args.out)}")
        return
    step_dir = import_hf(args.hf, args.out, allow_pickle=args.allow_pickle, **parse_overrides(args.overrides))
    print(f"wrote {step_dir}")


def cli() -> None:
    """`mtj-from-hf` (and `python scripts/from_hf.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
