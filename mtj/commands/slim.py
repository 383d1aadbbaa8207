"""Write a params-only copy of a checkpoint in bf16 or fp16 (no optimizer state), for sampling and serving;
`--quantize int8|int4` stores its matmul kernels and embedding table quantized (a quarter or an eighth of the bytes)."""


from mtj.cli import parser, run
from mtj.config import QUANTIZE
from mtj.workflows import slim


def main() -> None:
    ap = parser("mtj-slim", __doc__)
    ap.add_argument("--ckpt", required=True, help="a model_dir (latest step) or one step_N directory")
    ap.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="dtype of the slimmed weights (fp32 with --quantize: the rest as mtj.load(quantize=...) holds it)")
    ap.add_argument("--quantize", default="none", choices=QUANTIZE,
                    help="store the matmul kernels and the embedding table as int8 (a scale per output channel) or "
                         "int4 (per group of 128 input rows); the rest in --dtype")
    args = ap.parse_args()
    print(f"wrote {slim(args.ckpt, args.out, args.dtype, args.quantize)}")


def cli() -> None:
    """`mtj-slim` (and `python scripts/slim.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
