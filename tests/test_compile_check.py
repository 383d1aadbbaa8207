"""compile_check.py: ahead-of-time compiles for TPU topologies on this CPU machine (libtpu)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("libtpu", reason="libtpu (a test dependency on Linux x86_64) describes TPU topologies")


def run(*args: str, timeout: int = 300) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_check.py"), *args, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)  # the 5-minute bound of the issue
    line = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert line, out.stderr[-2000:]
    return json.loads(line[-1])


def test_gptj_6b_fits_v3_8_with_the_original_settings():
    # The original run: 8-way tensor parallel, GAS 16, rematerialised layers, bf16 gradient accumulator.
    r = run("--config", "configs/6B_roto_256.json", "--topology", "v3-8", "remat=true", "grad_accum_dtype=bfloat16")
    assert r["fits"] is True and r["mesh"] == {"dp": 1, "mp": 8}
    assert 5 < r["arguments_gib"] < r["total_gib"] <= r["hbm_per_device_gib"]
    assert r["flops_per_step"] > 1e15
    decode = r["decode"]  # generation (prefill + KV-cache decode loop) on the same mesh
    assert decode["fits"] is True and 2 < decode["arguments_gib"] < decode["total_gib"] < r["total_gib"]


def test_too_big_reports_fits_false_with_numbers():
    r = run("--config", "configs/6B_roto_256.json", "--topology", "v3-8")  # fp32 accumulator, no remat
    assert r["fits"] is False
    assert r["temporaries_gib"] > r["hbm_per_device_gib"] > 15
