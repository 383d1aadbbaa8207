"""What each backend does differently, in one table. General code reads a `Platform`'s fields; only this
module asks which backend a program runs on (tests/test_structure.py), as only families.py says which family
a model is.

The CPU rules come from XLA:CPU measurements (docs/performance.md): it updates one row of a bf16 array by
converting all of it, gathers from a bf16 embedding table by converting it whole, and converts the operands
of its bf16 dots; so on CPU the KV cache stays fp32, loaded weights stay in `param_dtype`, and mtj's own CPU
decode kernels (mtj/decode/cpu.py) are used. `skip_absent_tpu` is the one rule applied before JAX starts a
backend (at `import mtj`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from mtj.paths import user_path


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str  # JAX's platform name: "cpu", "gpu", "tpu"
    cache_float32: bool  # the decode engine's KV cache is fp32 whatever the compute dtype
    weights_in_compute_dtype: bool  # mtj.load holds weights in the compute dtype (decoding reads each once a token)
    cpu_kernels: bool  # mtj/decode/cpu.py's argmax and head screen (MTJ_CPU_KERNELS=0 turns them off to measure)
    measured_peak: bool  # MFU's peak is a measured matmul rate (the device table has none for a CPU)
    fused_attention: str | None  # the fused attention kernel this platform runs natively (`attention`), if any
    # Decoding's loop shape (mtj/decode/generator.py), measured on CPU and kept for the accelerators until
    # measured there: models up to `unroll_layers` deep decode over per-layer caches (deeper ones scan over
    # one stacked cache, so compile time stays flat), and long generations grow their cache in
    # `cache_phases` steps instead of attending to empty slots.
    unroll_layers: int = 16
    cache_phases: int = 4


PLATFORMS = {
    "cpu": Platform("cpu", cache_float32=True, weights_in_compute_dtype=False, cpu_kernels=True, measured_peak=True,
                    fused_attention=None),
    "gpu": Platform("gpu", cache_float32=False, weights_in_compute_dtype=True, cpu_kernels=False, measured_peak=False,
                    fused_attention="cudnn"),
    "tpu": Platform("tpu", cache_float32=False, weights_in_compute_dtype=True, cpu_kernels=False, measured_peak=False,
                    fused_attention="splash"),
}


def platform(name: str | None = None) -> Platform:
    """The platform named, or the one a program traced now runs on: the devices of the mesh set with
    `jax.set_mesh` (an ahead-of-time compile for a TPU topology runs on a CPU host), else JAX's backend."""
    if name is None:
        device = jax.sharding.get_abstract_mesh().abstract_device
        name = jax.default_backend() if device is None else device.platform
    return PLATFORMS.get(name, PLATFORMS["gpu"])  # (another accelerator: as a GPU)


def device_kind() -> str:
    """The kind of the traced program's devices ("TPU v3", ...), "" when no mesh is set."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return "" if device is None else device.device_kind


def cuda_compute_capability() -> str | None:
    """The first GPU's CUDA compute capability ("9.0"), None for a GPU that is not CUDA's (ROCm)."""
    device = jax.devices("gpu")[0]
    return device.compute_capability if "cuda" in device.client.platform_version.lower() else None


def cpu_kernels() -> bool:
    """Whether decoding uses mtj's CPU kernels: on CPU, unless MTJ_CPU_KERNELS=0."""
    return platform().cpu_kernels and os.environ.get("MTJ_CPU_KERNELS", "1") != "0"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (Linux's /proc/cpuinfo, read once; empty elsewhere)."""
    try:
        lines = user_path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def gloo_collectives() -> bool:
    """Whether processes on this host talk through gloo (CPU processes, not a TPU VM)."""
    return jax.config.jax_platforms in (None, "", "cpu") and not os.environ.get("TPU_NAME")


def skip_absent_tpu() -> None:
    """With libtpu installed (compile_check compiles for TPU topologies with it) on a machine without TPU
    chips, JAX would start the TPU runtime at its first use anyway, and libtpu prints five lines of
    TPU-detection errors that read like a failure. There JAX's TPU backend is dropped; compile_check
    loads libtpu by itself for its topologies. JAX_PLATFORMS, when set, decides instead."""
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
        return
    try:  # JAX's own test for TPU chips (its PCI vendor and device ids), as its TPU set-up uses it
        from jax._src import hardware_utils, xla_bridge

        tpu = xla_bridge._backend_factories.get("tpu")
        if tpu is not None and not xla_bridge._backends and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
            # The platform stays registered (Pallas registers TPU lowerings against it); its backend fails
            # quietly, as JAX's TPU factory does on a machine without libtpu.
            xla_bridge._backend_factories["tpu"] = dataclasses.replace(tpu, factory=_no_tpu_chips, fail_quietly=True)
    except (ImportError, AttributeError, TypeError):  # another JAX: its messages stay, nothing else changes
        pass


def _no_tpu_chips() -> None:
    raise RuntimeError("this machine has no TPU chips")
