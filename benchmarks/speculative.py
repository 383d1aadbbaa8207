#!/usr/bin/env python
"""Speculative decoding with prompt-lookup drafts against plain decoding, batch 1, greedy, on this machine.

Input-grounded output needs a model that copies from its prompt, so the benchmark first trains one (mtj's
Trainer, 1,200 steps, ~4 minutes on 2 cores): sequences of a random passage, a separator and the passage
again (an edit task reduced to its copying); its prompt is a new passage, the separator and the passage's
first 4 tokens, and it writes the rest. Then, on a random model of a realistic size whose attention is
sharp (init std 0.3; default 12 layers, d_model 768, GPT-2's vocabulary; fp32), a random prompt: its output
rarely repeats, so drafts are found now and then and rarely kept, the cost side of speculation.
Alternating plain and speculative rounds, medians; greedy output is checked equal with and without
speculation. Run inside ../shared/bin/offline.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

from common import REPO

sys.path.insert(0, str(REPO))

SEP = 1


def passages(rng: np.random.RandomState, n: int, length: int, vocab: int) -> np.ndarray:
    return rng.randint(2, vocab, (n, length)).astype(np.int32)


def train_copier(args: argparse.Namespace):
    """A GPT-J trained to copy: [passage, SEP, passage] sequences; the trained LM."""
    import jax

    from mtj.config import Config
    from mtj.lm import LM
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    half = args.passage
    cfg = Config(layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_vocab=args.vocab, seq=2 * half + 1,
                 pe_rotary_dims=args.d_model // args.heads // 2, per_replica_batch=args.batch, z_loss=0.0,
                 dtype="float32", warmup_steps=50, lr=args.lr, end_lr=args.lr / 10, total_steps=args.train_steps)
    mesh = make_mesh(mp=1, dp=1)
    trainer = Trainer(cfg, mesh)
    state = trainer.init()
    rng = np.random.RandomState(0)
    began = time.perf_counter()
    for step in range(args.train_steps):
        p = passages(rng, args.batch, half, args.vocab)
        batch = np.concatenate([p, np.full((args.batch, 1), SEP, np.int32), p, p[:, :1]], axis=1)[None]
        state, metrics = trainer.step(state, batch)
        if step % 100 == 0 or step == args.train_steps - 1:
            print(f"train step {step}: loss {float(metrics['loss']):.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    params = jax.device_get(state["params"])
    return LM(cfg.replace(seq=4 * half), params, mesh, None)


def rates(lm, prompt: list[int], new: int, ks: list[int], rounds: int) -> tuple[dict, list[int]]:
    """Median new tokens/s of each draft length k (0: plain decoding), alternating; and the greedy output."""
    outputs, times = {}, {k: [] for k in ks}
    for k in ks:  # compile
        lm.generate_tokens([prompt], new, temperature=0, speculate=k)
    for _ in range(rounds):
        for k in ks:
            began = time.perf_counter()
            outputs[k] = lm.generate_tokens([prompt], new, temperature=0, speculate=k)[0]
            times[k].append(len(outputs[k]) / (time.perf_counter() - began))
    assert all(out == outputs[0] for out in outputs.values()), "speculative greedy output differs from plain decoding"
    return {k: statistics.median(t) for k, t in times.items()}, outputs[0]


def sharp_random_lm(layers: int, d_model: int, heads: int, vocab: int, seq: int):
    """A random GPT-J (fp32) whose weights have std 0.3."""
    import jax

    from mtj.config import Config
    from mtj.lm import LM
    from mtj.model import init_params
    from mtj.sharding import make_mesh

    cfg = Config(layers=layers, d_model=d_model, n_heads=heads, n_vocab=vocab, seq=seq,
                 pe_rotary_dims=d_model // heads // 2, dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a * 15 if a.ndim >= 2 else a, params)  # std 0.02 -> 0.3
    return LM(cfg, params, make_mesh(mp=1, dp=1), None)


def show(name: str, result: dict, note: str = "") -> None:
    plain = result[0]
    cells = "  ".join(f"k={k} {r:7.1f} ({r / plain:.2f}x)" for k, r in result.items() if k)
    print(f"{name:36s} plain {plain:7.1f} tok/s  {cells}{note}")


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2, help="the copying model's")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--passage", type=int, default=128, help="tokens of a passage (the model's context: 4x)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--random-size", default="12,768,12", help="layers,d_model,heads of the random model")
    ap.add_argument("--speculate", default="4,8", help="draft lengths to measure")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ks = [0] + [int(k) for k in args.speculate.split(",")]
    copier = train_copier(args)
    rng = np.random.RandomState(1)
    p = passages(rng, 1, args.passage, args.vocab)[0].tolist()
    grounded, out = rates(copier, p + [SEP] + p[:4], args.passage - 4, ks, args.rounds)
    accuracy = float(np.mean(np.array(out) == np.array(p[4:])))
    copier_drafted, copier_kept = copier.generator.drafts
    layers, d_model, heads = (int(x) for x in args.random_size.split(","))
    sharp = sharp_random_lm(layers, d_model, heads, 50257, 512)
    random_text, _ = rates(sharp, rng.randint(0, 50257, 100).tolist(), 128, ks, args.rounds)
    drafted, kept = sharp.generator.drafts
    print(f"{cpu_name()}, {os.cpu_count()} cores; batch 1, greedy, medians of {args.rounds} alternating rounds")
    show(f"grounded: copier {args.layers}x{args.d_model} fp32", grounded, f"  (copy accuracy {accuracy:.0%}; draft "
         f"tokens kept {copier_kept}/{copier_drafted})")
    show(f"random text: random {layers}x{d_model} fp32", random_text, f"  (draft tokens kept {kept}/{drafted})")


if __name__ == "__main__":
    main()
