"""mtj: Mesh Transformer JAX, re-implemented on current JAX."""

from mtj.platforms import skip_absent_tpu

skip_absent_tpu()  # before anything starts a JAX backend

from mtj.config import Config, ConfigError, load_config  # noqa: E402
from mtj.lm import LM, load  # noqa: E402

__all__ = ["Config", "ConfigError", "LM", "load", "load_config"]
__version__ = "0.1.0"
