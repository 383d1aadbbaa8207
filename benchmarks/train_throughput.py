#!/usr/bin/env python
"""Training throughput: mtj's train step vs transformers' GPTJForCausalLM (PyTorch, AdamW) on this machine.

Same model config, batch, sequence length and dtype policy (fp32 master
weights; bf16 compute via autocast for PyTorch). Both are measured after
warm-up in the same run, in alternating rounds whose median is reported (this
kind of machine is noisy); tokens/s, MFU and the ratio are printed.
"""

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from common import alternating_rates, model_parser  # noqa: E402


def mtj_step(args) -> Callable[[], None]:
    """One synchronous mtj train step (the loss is fetched, so the step has finished)."""
    from mtj.config import Config
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    cfg = Config(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab,
                 pe_rotary_dims=args.d_model // args.heads // 2, seq=args.seq, per_replica_batch=args.batch,
                 dtype="bfloat16" if args.dtype == "bf16" else "float32", z_loss=0.0, warmup_steps=1,
                 scan_layers=args.scan_layers, remat=args.remat)
    trainer = Trainer(cfg, make_mesh(mp=1, dp=1))
    state = [trainer.init()]
    batch = np.random.RandomState(0).randint(0, args.vocab, (1, args.batch, args.seq + 1)).astype(np.int32)

    def step() -> None:
        state[0], m = trainer.step(state[0], batch)
        float(m["loss"])
    return step


def torch_step(args) -> Callable[[], None]:
    """One transformers/PyTorch train step."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    cfg = transformers.GPTJConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model, n_layer=args.layers,
                                  n_head=args.heads, rotary_dim=args.d_model // args.heads // 2)
    model = transformers.GPTJForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    batch = torch.tensor(np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq + 1)))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scan-layers", action="store_true",
                    help="scan over layers (mtj's default, for deep models' compile time); "
                         "a few layers run faster unrolled, as PyTorch runs them")
    ap.add_argument("--remat", action="store_true",
                    help="rematerialise every layer (mtj's default, for memory); off by default because "
                         "transformers trains without gradient checkpointing here")
    args = ap.parse_args()

    from mtj.config import Config
    from mtj.metrics import flops_per_token, peak_flops

    cfg = Config(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=args.seq,
                 pe_rotary_dims=args.d_model // args.heads // 2)
    flops, peak = flops_per_token(cfg), peak_flops("bfloat16" if args.dtype == "bf16" else "float32")
    steps = [mtj_step(args), torch_step(args)]
    for step in steps:
        for _ in range(args.warmup):
            step()
    runs = [lambda step=step: [step() for _ in range(args.steps)] for step in steps]
    rates = alternating_rates(runs, args.batch * args.seq * args.steps, args.rounds)
    ours, theirs = (float(np.median(r)) for r in rates)
    print(f"GPT-J {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, {args.dtype}, {'scanned' if args.scan_layers else 'unrolled'} layers; "
          f"peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'':14s}{'tokens/s':>10s}{'MFU':>8s}")
    print(f"{'mtj (JAX)':14s}{ours:10.0f}{ours * flops / peak:8.1%}")
    print(f"{'transformers':14s}{theirs:10.0f}{theirs * flops / peak:8.1%}")
    print(f"ratio mtj / transformers: {ours / theirs:.2f}x (median of {args.rounds} alternating rounds of "
          f"{args.steps} steps; per round mtj {', '.join(f'{r:.0f}' for r in rates[0])}, "
          f"transformers {', '.join(f'{r:.0f}' for r in rates[1])})")


if __name__ == "__main__":
    main()
