"""Convert an original Mesh Transformer JAX (v1) checkpoint, e.g. GPT-J-6B's step_383500, into an mtj checkpoint."""


from mtj.config import parse_overrides
from mtj.workflows import import_v1
from mtj.cli import parser, run


def main() -> None:
    ap = parser("mtj-from-mtj-v1", __doc__)
    ap.add_argument("--ckpt", required=True, help="v1 step directory (holding shard_0 .. shard_{cores_per_replica-1})")
    ap.add_argument("--config", required=True, help="the model's original config JSON, e.g. configs/6B_roto_256.json")
    ap.add_argument("--out", required=True, help="output checkpoint directory (step_0 is written inside)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. tokenizer=path/to/tokenizer.json")
    args = ap.parse_args()
    step_dir = import_v1(args.ckpt, args.config, args.out, **parse_overrides(args.overrides))
    print(f"wrote {step_dir}")


def cli() -> None:
    """`mtj-from-mtj-v1` (and `python scripts/from_mtj_v1.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
