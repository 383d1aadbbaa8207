#!/usr/bin/env python
"""A LoRA (and QLoRA) train step against a full fine-tuning step of the same model, on this machine.

Same model, batch, sequence length and compute dtype; the full step updates fp32 masters with Adam, the LoRA
step only the adapters (rank, targets as given) on a frozen base held in the compute dtype (or quantized:
--base-quant). Alternating timed rounds, medians; tokens/s, the ratio, and what each keeps on the device
besides activations: trained parameters, optimizer state, frozen base.
"""

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from common import alternating_rates, cpu_name, model_parser  # noqa: E402

PRESETS = {"small": dict(layers=4, d_model=256, heads=8), "162m": dict(layers=12, d_model=768, heads=12)}


def nbytes(tree) -> int:
    import jax

    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))


def make_step(cfg) -> tuple[Callable[[], None], dict]:
    """One synchronous train step of `cfg` (the loss is fetched), and its device-resident bytes."""
    import jax

    from mtj import lora
    from mtj.model import init_params
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    trainer = Trainer(cfg, make_mesh(mp=1, dp=1))
    if lora.enabled(cfg):  # a random base in the compute dtype, as restore_lora_base gives it
        base = lora.base_config(cfg)
        params = jax.jit(lambda k: jax.tree.map(lambda a: a.astype(cfg.dtype), init_params(base, k)))(jax.random.key(1))
        trainer.set_base(params, {"path": "random", "fingerprint": ""})
    state = [trainer.init()]
    batch = np.random.RandomState(0).randint(0, cfg.n_vocab, (1, cfg.per_replica_batch, cfg.seq + 1)).astype(np.int32)

    def step() -> None:
        state[0], m = trainer.step(state[0], batch)
        float(m["loss"])
    sizes = {"trained": nbytes(state[0]["params"]), "optimizer": nbytes(state[0]["opt_state"]),
             "frozen base": nbytes(trainer.base)}
    return step, sizes


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a model size (overrides --layers/--d-model/--heads)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q,k,v,out,ff_in,ff_out")
    ap.add_argument("--base-quant", choices=["none", "int8", "nf4"], default="none")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = ap.parse_args()
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)

    from mtj.config import Config
    from mtj.model import count_params

    full = Config(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
                  pe_rotary_dims=args.d_model // args.heads // 2, per_replica_batch=args.batch, z_loss=0.0,
                  dtype="bfloat16" if args.dtype == "bf16" else "float32", warmup_steps=1)
    adapted = full.replace(lora_rank=args.rank, lora_targets=args.targets.split(","), base_quant=args.base_quant)
    names = ["full fine-tune", f"LoRA r{args.rank}" + (f" ({args.base_quant} base)" if args.base_quant != "none" else "")]
    steps, sizes = zip(*(make_step(cfg) for cfg in (full, adapted)))
    for step in steps:
        step()
        step()
    runs = [lambda step=step: [step() for _ in range(args.steps)] for step in steps]
    rates = alternating_rates(runs, args.batch * args.seq * args.steps, args.rounds)
    medians = [float(np.median(r)) for r in rates]
    print(f"GPT-J {count_params(full) / 1e6:.0f}M ({args.layers} layers, d_model {args.d_model}), seq {args.seq}, "
          f"batch {args.batch}, {args.dtype}; LoRA on {args.targets}; CPU: {cpu_name()}")
    print(f"{'':24s}{'tokens/s':>10s}{'trained MB':>12s}{'optimizer MB':>14s}{'frozen MB':>11s}")
    for name, rate, size in zip(names, medians, sizes):
        print(f"{name:24s}{rate:10.0f}{size['trained'] / 1e6:12.1f}{size['optimizer'] / 1e6:14.1f}"
              f"{size['frozen base'] / 1e6:11.1f}")
    print(f"ratio LoRA / full: {medians[1] / medians[0]:.2f}x tokens/s, optimizer state "
          f"{sizes[1]['optimizer'] / sizes[0]['optimizer']:.4f}x (median of {args.rounds} alternating rounds of "
          f"{args.steps} steps; per round full {', '.join(f'{r:.0f}' for r in rates[0])}, "
          f"LoRA {', '.join(f'{r:.0f}' for r in rates[1])})")


if __name__ == "__main__":
    main()
