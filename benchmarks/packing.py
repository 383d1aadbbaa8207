#!/usr/bin/env python
"""Packed training against padded training on short fine-tuning examples, on this machine: useful tokens/s.

The same examples (random tokens, --min-tokens to --max-tokens long, the first 30% of each a prompt that is not
learned), the same model and batch shape: padded, each example alone in a row of seq+1 tokens (the rest padding,
masked); packed, as `create_tfrecords.py --format jsonl` packs them (`mtj.corpus.pack_examples`). Useful tokens
are the targets learned per step. Alternating timed rounds, medians, the ratio.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from common import alternating_rates, cpu_name, model_parser  # noqa: E402


def examples(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(lo, hi + 1, n):
        mask = np.ones(length, np.int32)
        mask[: int(0.3 * length)] = 0
        out.append((rng.integers(0, vocab, length).astype(np.int32), mask))
    return out


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    args = ap.parse_args()

    import jax.numpy as jnp

    from mtj.config import Config
    from mtj.corpus import pack_examples
    from mtj.model import count_params
    from mtj.sharding import make_mesh
    from mtj.train import Trainer, counted_targets

    cfg = Config(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
                 pe_rotary_dims=args.d_model // args.heads // 2, per_replica_batch=args.batch, warmup_steps=1,
                 dtype="bfloat16" if args.dtype == "bf16" else "float32")
    pool = examples(40 * args.batch, args.min_tokens, args.max_tokens, args.vocab)
    batches = {"padded": np.stack([pack_examples([ex], args.seq)[0] for ex in pool[:args.batch]]),
               "packed": pack_examples(pool, args.seq)[:args.batch]}
    trainer = Trainer(cfg, make_mesh(mp=1, dp=1))
    state = [trainer.init()]
    learned = {}

    def run(name: str) -> None:
        for _ in range(args.steps):
            state[0], m = trainer.step(state[0], batches[name][None])
            float(m["loss"])

    for name, batch in batches.items():
        learned[name] = int(counted_targets(jnp.asarray(batch[:, 1]), jnp.asarray(batch[:, 2])).sum())
        run(name)  # compiles (the same program: both batches have one shape)
    names = list(batches)
    rates = alternating_rates([lambda n=n: run(n) for n in names], args.steps, args.rounds)  # steps/s
    useful = {n: float(np.median(r)) * learned[n] for n, r in zip(names, rates)}
    print(f"GPT-J {count_params(cfg) / 1e6:.0f}M ({args.layers} layers, d_model {args.d_model}), seq {args.seq}, "
          f"batch {args.batch}, {args.dtype}; examples of {args.min_tokens}-{args.max_tokens} tokens, 30% prompt; "
          f"CPU: {cpu_name()}")
    print(f"{'':10s}{'steps/s':>10s}{'learned/step':>14s}{'useful tokens/s':>17s}{'tokens/s':>11s}")
    for name, r in zip(names, rates):
        steps = float(np.median(r))
        print(f"{name:10s}{steps:10.3f}{learned[name]:14d}{useful[name]:17.0f}{steps * args.batch * args.seq:11.0f}")
    print(f"ratio packed / padded: {useful['packed'] / useful['padded']:.2f}x useful tokens/s (median of "
          f"{args.rounds} alternating rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
