"""The accelerator benchmark runs here at its small size (its numbers are for README, not asserted)."""

import subprocess
import sys

from conftest import REPO


def test_the_accelerator_benchmark_runs_on_cpu_at_a_small_size():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accelerator.py"), "--reps", "1", "--new", "8",
                          "--decode-batches", "1,2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "device: cpu" in out.stdout and "preset small" in out.stdout
    for row in ("train tok/s", "decode b1 tok/s", "decode b2 tok/s", "mtj train MFU", "memory roofline"):
        assert row in out.stdout, out.stdout


def test_the_packing_benchmark_runs_at_a_tiny_size():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "packing.py"), "--seq", "128", "--batch", "2",
                          "--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "500", "--min-tokens", "10",
                          "--max-tokens", "40", "--rounds", "1", "--steps", "1"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(("padded", "packed"))}
    assert int(rows["packed"][2]) > 2 * int(rows["padded"][2])  # learned targets per step
    assert "ratio packed / padded" in out.stdout
