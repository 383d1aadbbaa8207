"""Rules about the machine's platforms that must hold before JAX starts a backend (applied at `import mtj`)."""

import dataclasses
import os


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
