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
