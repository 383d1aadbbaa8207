"""What the side-by-side benchmarks share: the model arguments, alternating timed rounds, and a checkout
of the baseline revision."""

import argparse
import contextlib
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def revision_tree(revision: str, at: Path) -> Iterator[Path]:
    """A checkout of `revision` (a git worktree of this repository) at `at`, removed afterwards."""
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(at), revision], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield at
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(at)], cwd=REPO, capture_output=True)


def model_parser(description: str) -> argparse.ArgumentParser:
    """Arguments for the GPT-J config both sides run, plus threads and rounds."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50400)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; the median is reported")
    return ap


# Before each timed run: lets the other side's worker threads (OpenMP spin-waits
# after a parallel region, XLA's pool) go idle so they do not steal the cores.
SETTLE_SECONDS = 1.0


def alternating_rates(runs: Sequence[Callable[[], None]], units: float, rounds: int) -> list[list[float]]:
    """units/second of each run, `rounds` times, alternating the runs so drifting
    machine load (+-15% on shared CPUs) hits every side alike."""
    rates: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, samples in zip(runs, rates):
            time.sleep(SETTLE_SECONDS)
            t = time.perf_counter()
            run()
            samples.append(units / (time.perf_counter() - t))
    return rates
