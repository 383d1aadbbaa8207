#!/usr/bin/env python
"""What the remat default costs on this machine: the demo's train step (configs/demo.json) with every
layer rematerialised (the default, as the original did) and without, in alternating timed rounds."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from common import alternating_rates  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.json")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    args = ap.parse_args()

    from mtj.config import load_config
    from mtj.metrics import _cpu_model
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    base = load_config(args.config)
    steps = []
    for remat in (True, False):
        trainer = Trainer(base.replace(remat=remat), make_mesh(mp=base.mp))
        batch = np.random.RandomState(0).randint(0, base.n_vocab, (base.gradient_accumulation_steps,
                                                 trainer.global_batch, base.seq + 1)).astype(np.int32)
        state = [trainer.init()]

        def step(trainer=trainer, state=state, batch=batch) -> None:
            state[0], m = trainer.step(state[0], batch)
            float(m["loss"])
        for _ in range(3):  # compile and warm up
            step()
        steps.append(step)
    tokens = base.gradient_accumulation_steps * trainer.global_batch * base.seq * args.steps
    runs = [lambda step=step: [step() for _ in range(args.steps)] for step in steps]
    with_remat, without = (float(np.median(r)) for r in alternating_rates(runs, tokens, args.rounds))
    print(f"{args.config} on {_cpu_model()}: tokens/s with remat (default) {with_remat:.0f}, "
          f"without {without:.0f}; remat costs {1 - with_remat / without:.1%} "
          f"(median of {args.rounds} alternating rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
