"""mtj: Mesh Transformer JAX, re-implemented on current JAX."""

from mtj.config import Config, ConfigError, load_config
from mtj.lm import LM, load

__all__ = ["Config", "ConfigError", "LM", "load", "load_config"]
__version__ = "0.1.0"
