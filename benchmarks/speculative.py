#!/usr/bin/env python
"""Speculative decoding with prompt-lookup drafts against plain decoding, batch 1, greedy, on this machine.

Input-grounded output needs a model that copies from its prompt, so the benchmark first trains one (mtj's
Trainer, a few hundred steps, on this CPU): sequences of a random passage, a separator and the passage again
(an edit task reduced to its copying). Then, alternating plain and speculative rounds (medians):
- grounded: the prompt is a new passage, the separator and the passage's first 4 tokens; the model writes
  the rest of the passage (its greedy copy accuracy is printed);
- random: the prompt is random tokens; whatever the model writes, drafts rarely match.
Greedy output is checked equal with and without speculation. Run inside ../shared/bin/offline.
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
                 dtype="float32", warmup_steps=20, lr=1e-3, end_lr=1e-4, total_steps=args.train_steps)
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


def rate(lm, prompt: list[int], new: int, speculate: int) -> tuple[float, list[int]]:
    began = time.perf_counter()
    out = lm.generate_tokens([prompt], new, temperature=0, speculate=speculate)[0]
    return len(out) / (time.perf_counter() - began), out


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--passage", type=int, default=96, help="tokens of a passage (the model's context: 4x)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--speculate", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    lm = train_copier(args)
    rng = np.random.RandomState(1)
    new = args.passage - 4
    workloads = {}
    for name in ("grounded", "random"):
        if name == "grounded":
            p = passages(rng, 1, args.passage, args.vocab)[0].tolist()
            prompt, truth = p + [SEP] + p[:4], p[4:]
        else:
            prompt, truth = passages(rng, 1, args.passage + 5, args.vocab)[0].tolist(), None
        for speculate in (0, args.speculate):  # compile both
            rate(lm, prompt, new, speculate)
        rates = {0: [], args.speculate: []}
        outputs = {}
        for _ in range(args.rounds):
            for speculate in rates:
                r, outputs[speculate] = rate(lm, prompt, new, speculate)
                rates[speculate].append(r)
        assert outputs[0] == outputs[args.speculate], "speculative greedy output differs from plain decoding"
        accuracy = None if truth is None else float(np.mean(np.array(outputs[0]) == np.array(truth)))
        workloads[name] = (statistics.median(rates[0]), statistics.median(rates[args.speculate]), accuracy)
    drafted, kept = lm.generator.drafts
    print(f"{cpu_name()}, {os.cpu_count()} cores; GPT-J {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, "
          f"fp32, batch 1, greedy, {new} new tokens, medians of {args.rounds} alternating rounds")
    for name, (plain, fast, accuracy) in workloads.items():
        note = f" (the model's copy accuracy {accuracy:.0%})" if accuracy is not None else ""
        print(f"{name:9s} plain {plain:7.1f} tok/s  speculate={args.speculate} {fast:7.1f} tok/s  {fast / plain:.2f}x{note}")
    print(f"draft tokens verified {drafted}, kept {kept} ({kept / max(drafted, 1):.0%})")


if __name__ == "__main__":
    main()
