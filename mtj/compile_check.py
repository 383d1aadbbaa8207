"""Ahead-of-time compilation of the real train step for a TPU topology (or N CPU devices), on this machine.

libtpu describes a pod slice without the hardware; XLA compiles the step for it
and reports per-device memory. A compile that runs out of HBM is caught and
reported as fits=false with the numbers XLA gives. When a config does not fit,
`check` searches the cheap fixes in order (compiling each candidate) and, if
none fits on that slice, the smallest slice of the same TPU generation that does.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from mtj import lora
from mtj.checkpoint import abstract_params
from mtj.config import REMAT_POLICIES, Config
from mtj.decode.cache import cache_dtype
from mtj.decode.generator import Generator
from mtj.lm import inference_config
from mtj.metrics import flops_per_token
from mtj.sharding import make_mesh
from mtj.train import Trainer

GIB = 2**30
MAX_BATCH = 4096  # check_inference searches no further
_LORA = {"lora_rank": 16, "lora_targets": ["q", "k", "v", "out", "ff_in", "ff_out"]}
LORA_ALTERNATIVES = (_LORA, {**_LORA, "base_quant": "int8"}, {**_LORA, "base_quant": "nf4"})  # what the advice offers
# name -> (libtpu topology, HBM per chip in GiB)
TOPOLOGIES = {
    "v2-8": ("v2:2x2", 16), "v2-32": ("v2:4x4", 16),
    "v3-8": ("v3:2x2", 32), "v3-32": ("v3:4x4", 32), "v3-64": ("v3:4x8", 32), "v3-128": ("v3:8x8", 32),
    "v3-256": ("v3:8x16", 32),
    "v4-8": ("v4:2x2x1", 32), "v4-16": ("v4:2x2x2", 32), "v4-32": ("v4:2x2x4", 32), "v4-64": ("v4:2x4x4", 32),
    "v5e-1": ("v5e:1x1", 16), "v5e-4": ("v5e:2x2", 16), "v5e-8": ("v5e:2x4", 16), "v5e-16": ("v5e:4x4", 16),
    "v5p-8": ("v5p:2x2x1", 95), "v5p-16": ("v5p:2x2x2", 95), "v5p-32": ("v5p:2x2x4", 95), "v5p-64": ("v5p:2x4x4", 95),
    "v6e-4": ("v6e:2x2", 32), "v6e-8": ("v6e:2x4", 32), "v6e-16": ("v6e:4x4", 32), "v6e-32": ("v6e:4x8", 32),
    "v6e-64": ("v6e:8x8", 32), "v6e-256": ("v6e:16x16", 32),
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
    # A v4 chip's two TensorCores run as one JAX device (megacore) on TPU VMs; libtpu's default describes each
    # core as a device with half the chip's HBM.
    chip = {"chip_config_name": "megacore"} if desc.startswith("v4") else {}
    devices = topologies.get_topology_desc(platform="tpu", topology_name=desc, **chip).devices
    chips = math.prod(int(d) for d in desc.split(":")[1].split("x"))
    return list(devices), hbm_chip * GIB * chips / len(devices)


def _gib(nbytes: float) -> float:
    return round(nbytes / GIB, 2)


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (shardings are even)."""
    # (bits: int4 and nf4 values take half a byte)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8
               for x in jax.tree.leaves(tree))


def _train_step(cfg: Config, devices: list, hbm: float | None) -> dict[str, Any]:
    """Compile one train step on `devices`; its memory per device, or why it does not fit."""
    if len(devices) % cfg.mp:
        raise ValueError(f"cores_per_replica={cfg.mp} does not divide the {len(devices)} devices")
    mesh = make_mesh(mp=cfg.mp, devices=devices)
    trainer = Trainer(cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.gradient_accumulation_steps, trainer.global_batch, cfg.seq + 1), jnp.int32,
                                 sharding=trainer.batch_sharding)
    state, base = trainer.abstract_state, trainer.abstract_base  # (base: LoRA's frozen one, else empty)
    params, optimizer, frozen = (_bytes_per_device(t) for t in (state["params"], state["opt_state"], base))
    tokens = cfg.gradient_accumulation_steps * trainer.global_batch * cfg.seq
    report: dict[str, Any] = {
        "mesh": dict(mesh.shape), "fsdp": cfg.fsdp, "tokens_per_step": tokens,
        "flops_per_step": flops_per_token(cfg) * tokens,
        "hbm_per_device_gib": None if hbm is None else _gib(hbm),
        "parameters_gib": _gib(params), "optimizer_state_gib": _gib(optimizer),
        **({"frozen_base_gib": _gib(frozen)} if base else {}),
        "arguments_gib": _gib(_bytes_per_device((state, batch, base))),
    }
    if hbm is not None and params + optimizer + frozen > hbm:  # no compile can make this fit
        return {**report, "temporaries_gib": None, "total_gib": None, "fits": False,
                "error": f"parameters and optimizer state alone need "
                f"{_gib(params + optimizer + frozen)} GiB per device, more than its {_gib(hbm)} GiB of HBM"}
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = trainer._step.lower(state, batch, base).compile()
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
            report["total_gib"] = round(report["arguments_gib"] + report["temporaries_gib"], 2)
        if available:  # what XLA can use of it, below the chip's nominal HBM (hbm_per_device_gib)
            report["hbm_available_gib"] = float(available.group(1))
        return report
    return {**report, "compile_seconds": round(time.perf_counter() - start, 1), **_memory(compiled, hbm)}


def _memory(compiled: Any, hbm: float | None) -> dict[str, Any]:
    """Per-device memory of a compiled program. Outputs count only what donated inputs do not hold."""
    mem = compiled.memory_analysis()
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes
    total = args + outputs + temp + mem.generated_code_size_in_bytes
    return {"arguments_gib": _gib(args), "temporaries_gib": _gib(temp), "outputs_gib": _gib(outputs),
            "total_gib": _gib(total), "fits": True if hbm is None else total <= hbm}


def _divisors_above(n: int, above: int, limit: int) -> list[int]:
    return [d for d in range(above + 1, limit + 1) if n % d == 0 and limit % d == 0]


def candidate_fixes(cfg: Config, devices: int) -> Iterator[dict[str, Any]]:
    """Overrides to try, cheapest first, each adding to the ones before: remat, a bf16 accumulator,
    fsdp (where dp > 1), a larger cores_per_replica, a smaller per_replica_batch; with LoRA, its frozen base
    quantized (int8, then nf4: QLoRA). Tokens per step stay the same: where dp or per_replica_batch shrinks,
    gradient_accumulation_steps grows to match."""
    fixes: dict[str, Any] = {}
    current = cfg

    def add(**changes: Any) -> dict[str, Any]:
        nonlocal current
        fixes.update(changes)
        current = cfg.replace(**fixes)
        return dict(fixes)

    if not cfg.remat:
        yield add(remat=True)
    if cfg.gradient_accumulation_steps > 1 and cfg.grad_accum_dtype != "bfloat16":
        yield add(grad_accum_dtype="bfloat16")
    if devices // cfg.mp > 1 and not cfg.fsdp:
        yield add(fsdp=True)
    for mp in _divisors_above(math.gcd(cfg.n_heads, cfg.ff_dim), current.mp, devices):
        old_dp, new_dp = devices // current.mp, devices // mp
        changes: dict[str, Any] = {"cores_per_replica": mp}
        if old_dp % new_dp == 0:
            changes["gradient_accumulation_steps"] = current.gradient_accumulation_steps * (old_dp // new_dp)
        yield add(**changes)
    for batch in reversed(_divisors_above(cfg.per_replica_batch, 0, cfg.per_replica_batch)[:-1]):
        steps = current.gradient_accumulation_steps * current.per_replica_batch // batch
        yield add(per_replica_batch=batch, gradient_accumulation_steps=steps)
    if cfg.lora_rank and cfg.base_quant == "none":
        yield add(base_quant="int8")
    if cfg.lora_rank and cfg.base_quant != "nf4":
        yield add(base_quant="nf4")


def lora_alternative(cfg: Config, devices: list, hbm: float) -> dict[str, Any] | None:
    """For a full fine-tune that does not fit: the first LoRA setting (rank 16 on the attention and MLP
    projections, then with its base quantized: QLoRA) whose step fits on `devices`, with its memory; None
    when none does (or `cfg` already trains adapters)."""
    if cfg.lora_rank:
        return None
    for changes in LORA_ALTERNATIVES:
        report = _train_step(cfg.replace(**changes), devices, hbm)
        if report["fits"]:
            return {"overrides": changes, **{k: report[k] for k in ("mesh", "frozen_base_gib", "total_gib")}}
    return None


def find_fixes(cfg: Config, devices: list, hbm: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The first candidate that fits on `devices`, and its report; None when none does."""
    for fixes in candidate_fixes(cfg, len(devices)):
        report = _train_step(cfg.replace(**fixes), devices, hbm)
        if report["fits"]:
            return fixes, report
    return None


def larger_topologies(name: str) -> list[str]:
    """The slices of the same TPU generation with more devices than `name`, smallest first."""
    generation = name.split("-")[0]
    size = int(name.split("-")[1])
    return sorted((t for t in TOPOLOGIES if t.split("-")[0] == generation and int(t.split("-")[1]) > size),
                  key=lambda t: int(t.split("-")[1]))


def smallest_topology(cfg: Config, name: str) -> dict[str, Any] | None:
    """The smallest larger slice of the same generation where `cfg`, or `cfg` with fixes, fits."""
    for topology in larger_topologies(name):
        devices, hbm = topology_devices(topology)
        if len(devices) % cfg.mp:
            continue
        report = _train_step(cfg, devices, hbm)
        found = ({}, report) if report["fits"] else find_fixes(cfg, devices, hbm)
        if found:
            fixes, report = found
            return {"topology": topology, "fixes": fixes, "total_gib": report["total_gib"],
                    "mesh": report["mesh"]}
    return None


def for_slice(cfg: Config, devices: int) -> tuple[Config, dict[str, Any]]:
    """`cfg` with cores_per_replica cut to what divides a slice of `devices` (a 6B config's 8 on one chip:
    1), and that change ({} for none)."""
    if devices % cfg.mp == 0:
        return cfg, {}
    mp = math.gcd(cfg.mp, devices)
    return cfg.replace(cores_per_replica=mp), {"cores_per_replica": mp}


def check(cfg: Config, topology: str, advise: bool = True, decode: bool = True) -> dict[str, Any]:
    """Compile `cfg`'s train step for `topology`: memory per device and whether it fits; `fixes`: {} when
    it fits, else (with `advise`) the overrides that make it fit here, or None and the smallest slice
    where it fits (`smallest_topology`). With `decode`, also compile generation on the same mesh.
    `adjusted`: what `for_slice` changed to place the config on the slice at all."""
    devices, hbm = topology_devices(topology)
    cfg, adjusted = for_slice(cfg, len(devices))
    report = {"topology": topology, "devices": len(devices), "adjusted": adjusted, **_train_step(cfg, devices, hbm),
              "fixes": None, "smallest_topology": None}
    if report["fits"]:
        report["fixes"] = {}
        if decode:
            mesh = make_mesh(mp=cfg.mp, devices=devices)
            report["decode"] = check_decode(cfg, mesh, hbm)
    elif advise and hbm is not None:
        found = find_fixes(cfg, devices, hbm)
        if found:
            report["fixes"] = found[0]
            report["fixed"] = {k: found[1][k] for k in ("mesh", "arguments_gib", "temporaries_gib", "total_gib")}
        else:
            report["smallest_topology"] = smallest_topology(cfg, topology)
        report["lora"] = lora_alternative(cfg, devices, hbm)
    return report


def remat_table(cfg: Config, topology: str) -> list[dict[str, Any]]:
    """The train step's memory per device under each `remat_policy` (and without remat), on `topology`."""
    devices, hbm = topology_devices(topology)
    variants = [("off", {"remat": False})] + [(p, {"remat": True, "remat_policy": p}) for p in REMAT_POLICIES]
    rows = []
    for name, changes in variants:
        r = _train_step(cfg.replace(**changes), devices, hbm)
        rows.append({"remat_policy": name, **{k: r.get(k) for k in ("temporaries_gib", "total_gib", "fits")}})
    return rows


def check_decode(cfg: Config, mesh: jax.sharding.Mesh, hbm: float | None, batch: int = 8,
                 prompt: int = 512, new_tokens: int = 512, quantize: str = "none") -> dict[str, Any]:
    """Compile generation (prefill + KV-cache decode loop) for `batch` prompts on the same mesh, with the
    weights as a model loaded there holds them (the compute dtype on TPUs; `quantize`: as a quantized
    checkpoint stores them, `mtj.quantize`). Per device: the weights, the KV cache (part of XLA's
    temporaries: the program makes it) and XLA's totals."""
    # (a LoRA model generates as its merged base)
    inference = inference_config(lora.base_config(cfg).replace(remat=False, quantize=quantize), {},
                                 mesh.devices.flat[0].platform)
    params = abstract_params(inference, mesh, quantize)
    gen = Generator(inference, params, mesh, eos_id=0)
    shape = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "quantize": quantize,
             "weights_gib": _gib(_bytes_per_device(params))}
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            shape["cache_gib"] = _gib(2 * cfg.layers * batch * cfg.n_heads * (prompt + new_tokens) * cfg.head_dim
                                      * cache_dtype(inference).itemsize / mesh.shape["mp"])
            compiled = gen._fn(new_tokens, streaming=False, greedy=False).lower(
                params, None, *gen.abstract_args(batch, prompt)).compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**shape, "fits": False, "error": str(e).strip().splitlines()[0][:300]}
    return {**shape, "compile_seconds": round(time.perf_counter() - start, 1), **_memory(compiled, hbm)}


def check_inference(cfg: Config, topology: str, quantize: str = "none", batch: int = 8, context: int = 1024,
                    largest_batch: bool = True) -> dict[str, Any]:
    """Generation alone (no train step) on `topology`: `check_decode` for `batch` rows of `context` tokens (half
    prompt, half new), and (`largest_batch`) the largest multiple of `batch` that fits there (doubling, then
    bisecting; every answer compiled): what the memory quantization frees is worth in rows."""
    devices, hbm = topology_devices(topology)
    cfg = for_slice(cfg, len(devices))[0]
    mesh = make_mesh(mp=cfg.mp, devices=devices)
    prompt = context // 2

    def fits(rows: int) -> bool:
        return check_decode(cfg, mesh, hbm, rows, prompt, context - prompt, quantize)["fits"]

    decode = check_decode(cfg, mesh, hbm, batch, prompt, context - prompt, quantize)
    if largest_batch and decode["fits"] and hbm is not None:
        low, high = batch, 2 * batch  # low fits; high is the next to try, then the smallest known not to
        while high <= MAX_BATCH and fits(high):
            low, high = high, 2 * high
        while high - low > batch:
            middle = (low + high) // 2 // batch * batch
            low, high = (middle, high) if fits(middle) else (low, middle)
        decode["largest_batch"], decode["failing_batch"] = low, high  # (high: compiled and did not fit, or untried)
    return {"topology": topology, "devices": len(devices), "mesh": dict(mesh.shape), "fits": decode["fits"],
            "decode": decode}
