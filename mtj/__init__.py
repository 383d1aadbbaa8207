"""mtj: Mesh Transformer JAX, re-implemented on current JAX."""

import os as _os


def _tune_xla_cpu() -> None:
    """On jaxlib 0.10, XLA:CPU's YNNPACK fusions make the small-batch LM-head matmuls and
    the bias/argmax reductions of these models 1.2-2x slower than XLA's own kernels
    (measured with benchmarks/). Turn them off unless the user set the flag. CPU only;
    XLA reads XLA_FLAGS when the backend starts, so this must run before that."""
    flag = "--xla_cpu_experimental_ynn_fusion_type"
    flags = _os.environ.get("XLA_FLAGS", "")
    if flag in flags or _os.environ.get("MTJ_KEEP_XLA_FLAGS"):
        return
    try:
        import jaxlib
    except ImportError:
        return
    if jaxlib.__version__.startswith("0.10."):  # the flag is not known to every version
        _os.environ["XLA_FLAGS"] = f"{flags} {flag}=".strip()


_tune_xla_cpu()

from mtj.config import Config, ConfigError, load_config  # noqa: E402
from mtj.lm import LM, load  # noqa: E402

__all__ = ["Config", "ConfigError", "LM", "load", "load_config"]
__version__ = "0.1.0"
