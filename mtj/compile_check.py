"""Ahead-of-time compilation of the real train step for a TPU topology (or N CPU devices), on this machine.

libtpu describes a pod slice without the hardware; XLA compiles the step for it
and reports per-device memory. A compile that runs out of HBM is caught and
reported as fits=false with the numbers XLA gives.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from mtj.config import Config
from mtj.metrics import flops_per_token
from mtj.sharding import make_mesh

GIB = 2**30
# name -> (libtpu topology, HBM per chip in GiB)
TOPOLOGIES = {
    "v2-8": ("v2:2x2", 16), "v2-32": ("v2:4x4", 16),
    "v3-8": ("v3:2x2", 32), "v3-32": ("v3:4x4", 32), "v3-64": ("v3:4x8", 32), "v3-128": ("v3:8x8", 32),
    "v3-256": ("v3:8x16", 32),
    "v4-8": ("v4:2x2x1", 32), "v4-16": ("v4:2x2x2", 32), "v4-32": ("v4:2x2x4", 32), "v4-64": ("v4:2x4x4", 32),
    "v5e-4": ("v5e:2x2", 16), "v5e-8": ("v5e:2x4", 16), "v5e-16": ("v5e:4x4", 16),
}


def topology_devices(name: str) -> tuple[list, float | None]:
    """(devices, HBM bytes per device) for a TPU topology name, or `cpu-N` for N CPU devices."""
    if name.startswith("cpu"):
        n = int(name.split("-")[1]) if "-" in name else jax.device_count()
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(f"{name} needs {n} CPU devices; set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return devices[:n], None
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology '{name}'; known: {', '.join(TOPOLOGIES)}, cpu-N")
    from jax.experimental import topologies

    desc, hbm_chip = TOPOLOGIES[name]
    devices = topologies.get_topology_desc(platform="tpu", topology_name=desc).devices
    chips = math.prod(int(d) for d in desc.split(":")[1].split("x"))
    return list(devices), hbm_chip * GIB * chips / len(devices)


def check(cfg: Config, topology: str) -> dict[str, Any]:
    from mtj.train import Trainer

    devices, hbm = topology_devices(topology)
    if len(devices) % cfg.mp:
        raise ValueError(f"cores_per_replica={cfg.mp} does not divide the {len(devices)} devices of {topology}")
    mesh = make_mesh(mp=cfg.mp, devices=devices)
    trainer = Trainer(cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.gradient_accumulation_steps, trainer.global_batch, cfg.seq + 1), jnp.int32,
                                 sharding=trainer.batch_sharding)
    tokens = cfg.gradient_accumulation_steps * trainer.global_batch * cfg.seq
    report: dict[str, Any] = {
        "topology": topology, "devices": len(devices), "mesh": dict(mesh.shape), "fsdp": cfg.fsdp,
        "hbm_per_device_gib": None if hbm is None else round(hbm / GIB, 2),
        "tokens_per_step": tokens, "flops_per_step": flops_per_token(cfg) * tokens,
    }
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = trainer._step.lower(trainer.abstract_state, batch).compile()
    except Exception as e:  # XLA refuses programs that do not fit in HBM
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        report.update(fits=False, compile_seconds=round(time.perf_counter() - start, 1),
                      error=message.strip().splitlines()[0][:500])
        # e.g. "the total memory required for HLO temporaries (22.75G) exceeds available HBM (15.48G)"
        required = re.search(r"required for HLO temporaries \(([\d.]+)G\)", message)
        available = re.search(r"available HBM \(([\d.]+)G\)", message)
        if required:
            report["temporaries_gib"] = float(required.group(1))
        if available:
            report["hbm_per_device_gib"] = float(available.group(1))
        return report
    report.update(compile_seconds=round(time.perf_counter() - start, 1), **_memory(compiled, hbm))
    report["decode"] = check_decode(cfg, mesh, trainer.abstract_state["params"], hbm)
    return report


def _memory(compiled: Any, hbm: float | None) -> dict[str, Any]:
    mem = compiled.memory_analysis()
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    total = args + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp + mem.generated_code_size_in_bytes
    return {"arguments_gib": round(args / GIB, 2), "temporaries_gib": round(temp / GIB, 2),
            "total_gib": round(total / GIB, 2), "fits": True if hbm is None else total <= hbm}


def check_decode(cfg: Config, mesh: jax.sharding.Mesh, params: Any, hbm: float | None, batch: int = 8,
                 prompt: int = 512, new_tokens: int = 512) -> dict[str, Any]:
    """Compile generation (prefill + KV-cache decode loop) for `batch` prompts on the same mesh."""
    from mtj.generate import Generator

    inference = cfg.replace(remat=False)
    gen = Generator(inference, params, mesh, eos_id=0)
    sds = jax.ShapeDtypeStruct
    args = (sds((batch, prompt), jnp.int32), sds((batch, prompt), bool), sds((), jnp.int32), sds((batch,), jnp.float32),
            sds((batch,), jnp.int32), sds((batch,), jnp.float32), sds((batch,), jnp.uint32), sds((), jnp.int32))
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = gen._fn(new_tokens, streaming=False, greedy=False).lower(params, None, *args).compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "fits": False,
                "error": str(e).strip().splitlines()[0][:300]}
    return {"batch": batch, "prompt": prompt, "new_tokens": new_tokens,
            "compile_seconds": round(time.perf_counter() - start, 1), **_memory(compiled, hbm)}
