"""Run and model configuration: the JSON keys of SPEC §2, validated.

Every key of the original Mesh Transformer JAX configs is accepted with its
original meaning; the new keys default to GPT-J-6B's values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any

from mtj.families import FAMILIES, Family
from mtj.paths import PathLike, user_path, write_atomic


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending keys."""


MODEL_TYPES = tuple(FAMILIES)
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the command lines' spellings
QUANTIZE = ("none", "int8", "int4")  # inference weights (mtj.quantize)
LORA_TARGETS = ("q", "k", "v", "out", "ff_in", "ff_out")  # the projections LoRA may adapt (mtj.lora)
BASE_QUANT = ("none", "int8", "nf4")  # the frozen base under LoRA (QLoRA)
ACTIVATIONS = ("gelu_new", "gelu", "gelu_fast", "relu", "silu")
# What a rematerialised layer saves for the backward pass (MaxText's names): "full" nothing (recompute the
# layer), "minimal" the projections' outputs (q/k/v, MLP in, output), "save_qkv_proj" the q/k/v projections,
# "none" all.
REMAT_POLICIES = ("full", "minimal", "save_qkv_proj", "none")
ATTENTION = ("auto", "xla", "cudnn", "splash")
VOCAB_ALIGN = 128  # padded vocabulary rows are a multiple of this (and of mp)


@dataclasses.dataclass
class Config:
    # --- original Mesh Transformer JAX keys (GPT-J-6B values) ---
    layers: int = 28
    d_model: int = 4096
    n_heads: int = 16
    n_vocab: int = 50400
    norm: str = "layernorm"
    pe: str = "rotary"
    pe_rotary_dims: int | None = None  # None: the whole head (GPT-J uses 64)
    seq: int = 2048
    cores_per_replica: int = 1
    per_replica_batch: int = 1
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    anneal_steps: int = 0
    lr: float = 1e-4
    end_lr: float = 1e-5
    weight_decay: float = 0.1
    total_steps: int = 1000
    tpu_size: int | None = None
    bucket: str = ""
    model_dir: str = "runs/model"
    train_set: str | dict[str, float] = ""  # a source, or sources -> weights (a mixture)
    val_set: dict[str, str] = dataclasses.field(default_factory=dict)
    eval_harness_tasks: list[str] = dataclasses.field(default_factory=list)
    val_batches: int = 0
    val_every: int = 0
    ckpt_every: int = 0
    keep_every: int = 0
    name: str = "mtj"
    wandb_project: str | None = None
    comment: str = ""
    # --- new keys ---
    model_type: str = "gptj"
    d_head: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 * d_model
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    attention_layers: list[str] | None = None
    window_size: int = 256
    tie_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    tokenizer: str | None = None  # None: the family's usual tokenizer
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    fsdp: bool = False
    remat: bool = True  # the original's default: every layer rematerialised (GPT-J-6B fits a v3-8 only so)
    remat_policy: str = "full"  # what a rematerialised layer keeps (REMAT_POLICIES, MaxText's names)
    attention: str = "auto"  # "xla", or a fused kernel: "cudnn" (GPU), "splash" (TPU); "auto": the platform's
    scan_layers: bool = True
    z_loss: float = 1e-4
    grad_accum_dtype: str = "bfloat16"  # the original's gradient accumulator (with gradient_accumulation_steps > 1)
    seed: int = 0
    log_every: int = 1
    keep_last: int = 3
    quantize: str = "none"  # inference weights: "int8" (a scale per output channel), "int4" (per group of 128 rows)
    lora_rank: int = 0  # LoRA adapters' rank (0: off; training then updates the adapters only, mtj.lora)
    lora_alpha: float = 16.0  # the adapters' product is scaled by lora_alpha / lora_rank (PEFT's rule)
    lora_dropout: float = 0.0  # dropout on the adapters' inputs while training
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])  # PEFT's default for GPT-J
    base_quant: str = "none"  # the frozen base's storage under LoRA: "int8", "nf4" (QLoRA)
    skip_corrupt_records: bool = False  # skip (with a warning) TFRecords with bad CRCs instead of failing

    def __post_init__(self) -> None:
        for key in ("dtype", "param_dtype", "grad_accum_dtype"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, DTYPE_ALIASES.get(value, value))
        _check_types(self)
        _check_consistency(self)

    @property
    def family(self) -> Family:
        """What the model_type's architecture is (mtj.families)."""
        return FAMILIES[self.model_type]

    # --- derived sizes ---
    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def rotary_dims(self) -> int:
        return self.pe_rotary_dims if self.pe_rotary_dims is not None else self.head_dim

    @property
    def mp(self) -> int:
        return self.cores_per_replica

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and LM head: n_vocab rounded up so that mp divides it."""
        align = math.lcm(VOCAB_ALIGN, self.mp)
        return -(-self.n_vocab // align) * align

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return from_dict({**self.to_dict(), **changes})

    def save(self, path: PathLike) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


KEYS = tuple(f.name for f in dataclasses.fields(Config))


def from_dict(values: dict[str, Any]) -> Config:
    unknown = [k for k in values if k not in KEYS]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, KEYS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    values = dict(values)
    if isinstance(values.get("val_set"), str):  # a single index file
        values["val_set"] = {"val": values["val_set"]}
    return Config(**values)


def load_config(path: PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a JSON config and apply `key=value` overrides."""
    path = user_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    values.update(parse_overrides(overrides))
    return from_dict(values)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` pairs; the value is JSON when it parses, else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# --- validation ---------------------------------------------------------------

def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    raise TypeError(f"unhandled annotation {tp}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("NoneType", "null")


def _check_types(cfg: Config) -> None:
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(
                f"config key '{f.name}' must be {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__})"
            )
        if isinstance(value, int) and not isinstance(value, bool) and hints[f.name] in (float, float | None):
            setattr(cfg, f.name, float(value))


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_consistency(c: Config) -> None:
    _require(c.model_type in MODEL_TYPES, f"config key 'model_type' must be one of {MODEL_TYPES}, got '{c.model_type}'")
    _require(c.dtype in DTYPES, f"config key 'dtype' must be one of {DTYPES}, got '{c.dtype}'")
    _require(c.param_dtype in DTYPES, f"config key 'param_dtype' must be one of {DTYPES}, got '{c.param_dtype}'")
    _require(c.grad_accum_dtype in DTYPES,
             f"config key 'grad_accum_dtype' must be one of {DTYPES}, got '{c.grad_accum_dtype}'")
    _require(c.activation in ACTIVATIONS, f"config key 'activation' must be one of {ACTIVATIONS}, got '{c.activation}'")
    _require(c.remat_policy in REMAT_POLICIES,
             f"config key 'remat_policy' must be one of {REMAT_POLICIES}, got '{c.remat_policy}'")
    _require(c.quantize in QUANTIZE, f"config key 'quantize' must be one of {QUANTIZE}, got '{c.quantize}'")
    _check_lora(c)
    if isinstance(c.train_set, dict):
        _require(bool(c.train_set) and all(math.isfinite(w) and w > 0 for w in c.train_set.values()),
                 f"config key 'train_set' as a mixture maps sources to positive weights, got {c.train_set}")
        _require(not any(name.startswith("tfds:") for name in c.train_set),
                 "config key 'train_set': a mixture's sources are .index files or text files (tfds:NAME streams cannot mix)")
    _require(c.attention in ATTENTION, f"config key 'attention' must be one of {ATTENTION}, got '{c.attention}'")
    _require(c.norm == "layernorm", f"config key 'norm' must be 'layernorm', got '{c.norm}'")
    for key in ("layers", "d_model", "n_heads", "n_vocab", "seq", "cores_per_replica", "per_replica_batch",
                "gradient_accumulation_steps", "window_size", "log_every", "d_head", "d_ff", "tpu_size",
                "layer_norm_eps", "rotary_base"):
        value = getattr(c, key)
        _require(value is None or (math.isfinite(value) and value > 0), f"config key '{key}' must be positive, got {value}")
    for key in ("warmup_steps", "anneal_steps", "total_steps", "val_batches", "val_every", "ckpt_every",
                "keep_every", "keep_last", "lr", "end_lr", "weight_decay", "z_loss"):
        value = getattr(c, key)
        _require(math.isfinite(value) and value >= 0, f"config key '{key}' must be 0 or more, got {value}")
    if c.d_head is None:
        _require(c.d_model % c.n_heads == 0,
                 f"n_heads={c.n_heads} does not divide d_model={c.d_model} (keys 'n_heads', 'd_model'); set 'd_head' to use other sizes")
    _require(c.n_heads % c.cores_per_replica == 0,
             f"n_heads={c.n_heads} is not divisible by cores_per_replica={c.cores_per_replica} "
             "(keys 'n_heads', 'cores_per_replica'): tensor parallelism splits whole heads")
    _require(c.ff_dim % c.cores_per_replica == 0,
             f"d_ff={c.ff_dim} is not divisible by cores_per_replica={c.cores_per_replica} (keys 'd_ff', 'cores_per_replica')")
    if c.family.rotary:
        _require(c.pe == "rotary", f"config key 'pe' must be 'rotary' for model_type '{c.model_type}', got '{c.pe}'")
        _require(0 < c.rotary_dims <= c.head_dim,
                 f"pe_rotary_dims={c.rotary_dims} must be in 1..d_head={c.head_dim} (keys 'pe_rotary_dims', 'd_head')")
        _require(c.rotary_dims % 2 == 0, f"pe_rotary_dims={c.rotary_dims} must be even (key 'pe_rotary_dims')")
    if c.attention_layers is not None:
        _require(len(c.attention_layers) == c.layers,
                 f"attention_layers has {len(c.attention_layers)} entries but layers={c.layers} (keys 'attention_layers', 'layers')")
        bad = [a for a in c.attention_layers if a not in ("global", "local")]
        _require(not bad, f"config key 'attention_layers' entries must be 'global' or 'local', got {bad[0]!r}" if bad else "")


def _check_lora(c: Config) -> None:
    _require(c.lora_rank >= 0, f"config key 'lora_rank' must be 0 (off) or more, got {c.lora_rank}")
    _require(0 <= c.lora_dropout < 1, f"config key 'lora_dropout' must be in [0, 1), got {c.lora_dropout}")
    _require(math.isfinite(c.lora_alpha) and c.lora_alpha > 0, f"config key 'lora_alpha' must be positive, got {c.lora_alpha}")
    bad = [t for t in c.lora_targets if t not in LORA_TARGETS]
    _require(not bad, f"config key 'lora_targets' entries must be among {LORA_TARGETS}, got {bad[0]!r}" if bad else "")
    _require(bool(c.lora_targets) and len(set(c.lora_targets)) == len(c.lora_targets),
             f"config key 'lora_targets' must name each target once, got {c.lora_targets}")
    _require(c.base_quant in BASE_QUANT, f"config key 'base_quant' must be one of {BASE_QUANT}, got '{c.base_quant}'")
    _require(c.base_quant == "none" or c.lora_rank > 0,
             f"base_quant={c.base_quant!r} quantizes the frozen base of LoRA training: set lora_rank too")
