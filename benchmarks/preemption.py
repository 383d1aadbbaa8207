"""SIGTERM at random moments of a two-process training run (dp=2, CPU), locally and in a GCS emulator bucket.

Each trial starts both processes of `scripts/train.py` on one run directory (so each resumes where the last
trial stopped) and signals both (every fourth trial only process 1) at a moment drawn uniformly from the
span the uninterrupted run took from its summary line to its last step (restore, compilation and training:
wherever unsaved work exists), or a little past it. Every third trial a second SIGTERM follows during the
save; one trial per place is a SIGINT (Ctrl-C). A trial passes when both processes exit 0 within 10 s of
the signal (within 30 s after the first step, when the signal came while it compiled), the lead names the
step it saved (or the run finished), that is the newest step, no more than 2 steps after the progress
bar's step at the signal, and metrics.jsonl holds every step once with the uninterrupted run's losses,
exactly. A run that reaches the end starts again in a fresh directory.

    ../shared/bin/offline .venv/bin/python benchmarks/preemption.py [--trials 20] [--steps 40]

tests/test_scale.py does one such trial per place in the suite; this is the long version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
from etils.epath import backend

from common import REPO, cpu_name, emulator

sys.path.insert(0, str(REPO))
from mtj import checkpoint  # noqa: E402
from mtj.config import from_dict  # noqa: E402


def config(model_dir: str, steps: int) -> dict:
    assets = Path(os.environ.get("MTJ_ASSETS", REPO.parent / "shared" / "assets"))
    return dict(layers=2, d_model=64, n_heads=8, pe_rotary_dims=4, n_vocab=50257, seq=32, per_replica_batch=4,
                cores_per_replica=4, lr=3e-3, end_lr=3e-4, warmup_steps=10, anneal_steps=190, total_steps=steps,
                dtype="float32", tokenizer="gpt2", train_set=str(assets / "text" / "tinyshakespeare.txt"),
                model_dir=model_dir, log_every=1, ckpt_every=10, seed=3)


class Run:
    """Both processes of one launch, their output read as it comes."""

    def __init__(self, cfg_path: Path, port: int, env: dict):
        env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "TQDM_MININTERVAL": "0"}
        self.procs = [subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(cfg_path),
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
        self.text = ["", ""]
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(2)]
        for r in self.readers:
            r.start()

    def _read(self, i: int) -> None:
        while chunk := os.read(self.procs[i].stdout.fileno(), 65536):
            self.text[i] += chunk.decode(errors="replace")

    def wait_for(self, text: str) -> float:
        while text not in self.text[0]:
            if self.procs[0].poll() is not None:
                raise RuntimeError(self.text[0][-3000:])
            time.sleep(0.01)
        return time.perf_counter()

    def step(self, total: int) -> int:
        """The lead's progress bar's step (the bar is redrawn at every step)."""
        return max(map(int, re.findall(rf"(\d+)/{total} ", self.text[0])), default=0)

    def signal(self, sig: int, to: tuple[int, ...] = (0, 1)) -> None:
        for p in (self.procs[i] for i in to):
            if p.poll() is None:
                p.send_signal(sig)

    def finish(self) -> list[int]:
        codes = [p.wait(timeout=600) for p in self.procs]
        for r in self.readers:
            r.join()
        return codes


def forget_listings() -> None:
    """Another process wrote the bucket: drop the listings (and sizes) this one cached."""
    backend.fsspec_backend._get_filesystem("gcs").invalidate_cache()  # etils.epath's (Orbax lists through it)
    fsspec.filesystem("gs").invalidate_cache()


def losses(run: str) -> list[tuple[int, float]]:
    fs, path = fsspec.core.url_to_fs(run)
    rows = [json.loads(line) for line in fs.cat_file(f"{path}/metrics.jsonl").decode().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="per place")
    ap.add_argument("--steps", type=int, default=40, help="total_steps of the run")
    ap.add_argument("--places", default="local,bucket")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); seed {seed}; {args.trials} trials per place; "
          f"{args.steps} steps a run", flush=True)
    work = Path(tempfile.mkdtemp(prefix="mtj-preemption-"))
    server, port = emulator(work)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
           "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    try:
        def launch(model_dir: str) -> Run:
            from_dict(config(model_dir, args.steps)).save(work / "cfg.json")
            return Run(work / "cfg.json", free_port(), env)

        ref = launch(str(work / "ref"))
        began = ref.wait_for("\ndata: ")
        while ref.step(args.steps) < args.steps and ref.procs[0].poll() is None:
            time.sleep(0.01)
        span = time.perf_counter() - began  # to its last step: later signals find it finishing
        assert ref.finish() == [0, 0], ref.text[0][-3000:]
        expected = dict(losses(str(work / "ref")))
        print(f"reference run: {span:.1f} s from its summary line to its last step", flush=True)
        summary = {}
        for place in args.places.split(","):
            passed, runs = 0, 0
            run = None
            for trial in range(1, args.trials + 1):
                if run is None:
                    runs += 1
                    run = str(work / f"local-{runs}") if place == "local" else f"gs://bench/run-{runs}"
                sig = signal.SIGINT if trial == args.trials // 2 else signal.SIGTERM
                twice = sig == signal.SIGTERM and trial % 3 == 0
                to = (1,) if trial % 4 == 0 else (0, 1)
                before = (checkpoint.complete_steps(run) or [0])[0]  # where this launch resumes
                launched = launch(run)
                delay = float(rng.uniform(0, span * 1.1))
                launched.wait_for("\ndata: ")
                time.sleep(delay)
                shown = max(launched.step(args.steps), before)  # (before the bar is drawn: where it resumes)
                launched.signal(sig, to)
                signalled = time.perf_counter()
                if twice:
                    time.sleep(0.2)
                    launched.signal(sig, to)
                codes = launched.finish()
                took = time.perf_counter() - signalled
                forget_listings()
                out = launched.text[0]
                said = re.search(r"after step (\d+): checkpoint", out)
                saved = checkpoint.complete_steps(run)[0] if checkpoint.complete_steps(run) else None
                got = losses(run)
                finished = "trained steps" in out or "already at step" in out
                stopped = int(said.group(1)) if said else (args.steps if finished else None)
                rows_ok = [s for s, _ in got] == list(range(1, len(got) + 1)) and all(loss == expected[s] for s, loss in got)
                compiling = shown == before  # (the first step after a start includes its compilation)
                prompt = took < (30 if compiling else 10) and stopped is not None and stopped <= shown + 2
                checks = {"exit 0": codes == [0, 0], "prompt": prompt, "named step is the newest": stopped == saved,
                          "one row per step": len(got) == stopped, "losses equal": rows_ok}
                ok = all(checks.values())
                passed += ok
                print(f"{place} trial {trial:2d}: {signal.Signals(sig).name}{' x2' if twice else ''}"
                      f"{' to process 1' if to == (1,) else ''} at +{delay:5.2f} s "
                      f"(bar at step {shown}) -> exit {codes} {took:.1f} s later, {'stopped after step ' + str(stopped) if said else 'finished' if finished else 'NO STEP'}"
                      f", newest step {saved}, {len(got)} rows" + ("; losses equal to the reference" if ok else
                      "; FAILED: " + ", ".join(k for k, v in checks.items() if not v)), flush=True)
                if not ok:
                    print(out[-3000:], launched.text[1][-2000:], sep="\n")
                if finished:
                    run = None
            summary[place] = f"{passed}/{args.trials}"
        print("passed: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
