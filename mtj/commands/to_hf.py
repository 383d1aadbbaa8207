"""Export an mtj checkpoint to a Hugging Face directory that transformers loads."""

import argparse

from mtj.convert import parse_size
from mtj.workflows import export_hf
from mtj.cli import parser, run


def main() -> None:
    ap = parser("mtj-to-hf", __doc__)
    ap.add_argument("--ckpt", required=True, help="a model_dir (latest step) or one step_N directory")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the exported weights")
    ap.add_argument("--max-shard-size", type=size, default="50GB",
                    help="largest weights file; a larger export is sharded with model.safetensors.index.json "
                    "(bytes, or e.g. 500MB, 5GB, 2GiB)")
    lora = ap.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", dest="lora_export", action="store_const", const="merge", default="none",
                      help="a checkpoint of LoRA adapters: export one model, the adapters merged into their base")
    lora.add_argument("--peft", dest="lora_export", action="store_const", const="peft",
                      help="a checkpoint of LoRA adapters: export PEFT's adapter files (adapter_config.json, "
                      "adapter_model.safetensors) for peft.PeftModel.from_pretrained on the base's export")
    args = ap.parse_args()
    print(f"wrote {export_hf(args.ckpt, args.out, args.dtype, args.max_shard_size, args.lora_export)}")


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cli() -> None:
    """`mtj-to-hf` (and `python scripts/to_hf.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
