#!/usr/bin/env python
"""Data pipeline throughput: tokenizing (create_tfrecords) and loading (TFRecord -> batches), in tokens/s.

Loading must outpace training by a wide margin: the ratio to the demo model's
measured training rate (--train-tokens-per-sec) is printed.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtj.corpus import create_tfrecords  # noqa: E402
from mtj.data import Loader, TFRecordSource  # noqa: E402
from mtj.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    assets = Path(os.environ.get("MTJ_ASSETS", "../shared/assets"))
    ap.add_argument("--input", default=str(assets / "text" / "tinyshakespeare.txt"))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-tokens-per-sec", type=float, default=None,
                    help="the demo's training rate to compare with (default: measure 10 demo steps)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        index = create_tfrecords(args.input, "bench", tmp, load_tokenizer("gpt2"), seq=args.seq, progress=False)
        tokenize_s = time.perf_counter() - t
        source = TFRecordSource(index, args.seq)
        tokens = len(source) * (args.seq + 1)
        loader = Loader(source, gas=1, global_batch=args.batch, seed=0)
        t = time.perf_counter()
        for _ in range(loader.steps_per_epoch):
            next(loader)
        load_s = time.perf_counter() - t
        load_tps = loader.steps_per_epoch * args.batch * (args.seq + 1) / load_s

    train_tps = args.train_tokens_per_sec or measure_demo_training()
    print(f"tokenize+write: {tokens / tokenize_s:12,.0f} tokens/s  ({tokens:,} tokens in {tokenize_s:.1f}s)")
    print(f"load batches:   {load_tps:12,.0f} tokens/s")
    print(f"demo training:  {train_tps:12,.0f} tokens/s")
    print(f"loading / training: {load_tps / train_tps:.0f}x")


def measure_demo_training() -> float:
    import numpy as np

    from mtj.config import load_config
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.json")
    trainer = Trainer(cfg, make_mesh(mp=1, dp=1))
    state = trainer.init()
    batch = np.random.RandomState(0).randint(0, cfg.n_vocab, (cfg.gradient_accumulation_steps, cfg.per_replica_batch,
                                                              cfg.seq + 1)).astype(np.int32)
    state, m = trainer.step(state, batch)
    float(m["loss"])
    t = time.perf_counter()
    for _ in range(10):
        state, m = trainer.step(state, batch)
    float(m["loss"])
    return 10 * batch[..., 1:].size / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
