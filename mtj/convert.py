"""Hugging Face <-> mtj conversion, driven by the families' tables (mtj.families): config keys
and weight names are data; this module applies them to configs, arrays and files.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from mtj.config import Config, from_dict
from mtj.families import FAMILIES, Weight
from mtj.model import Params, param_specs
from mtj.paths import PathLike, user_path


# --- configs -------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], **overrides: Any) -> Config:
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        raise ValueError(f"HF model_type '{hf.get('model_type')}' is not supported; supported: {sorted(FAMILIES)}")
    return from_dict({**family.config_from_hf(hf), **overrides})


def config_to_hf(cfg: Config, eos_id: int | None = 50256) -> dict[str, Any]:
    return {"model_type": cfg.model_type, "architectures": [cfg.family.hf_architecture], "bos_token_id": eos_id,
            "eos_token_id": eos_id, "dtype": "float32", **cfg.family.config_to_hf(cfg)}


# --- weights -------------------------------------------------------------------

def spec_at(specs: Params, path: str) -> Any:
    node = specs
    for part in path.split("."):
        node = node[part]
    return node


def _table(cfg: Config) -> list[Weight]:
    specs = param_specs(cfg)
    table = []
    for w in cfg.family.weights:
        try:
            spec_at(specs, w.ours)
        except KeyError:
            continue  # e.g. lm_head when embeddings are tied
        table.append(w)
    return table


def pad_vocab(a: np.ndarray, axes: tuple, cfg: Config) -> np.ndarray:
    for dim, axis in enumerate(axes):
        if axis == "vocab" and a.shape[dim] != cfg.padded_vocab:
            pad = [(0, 0)] * a.ndim
            pad[dim] = (0, cfg.padded_vocab - a.shape[dim])
            a = np.pad(a, pad)
    return a


def _unpad_vocab(a: np.ndarray, axes: tuple, cfg: Config) -> np.ndarray:
    index = tuple(slice(0, cfg.n_vocab) if axis == "vocab" else slice(None) for axis in axes)
    return a[index]


def _unfuse(t: np.ndarray, w: Weight, n_heads: int) -> np.ndarray:
    """Our part of a per-head fused HF tensor: [H * parts * Dh, ...] -> [H * Dh, ...]."""
    if w.fused is None:
        return t
    part, parts = w.fused
    per_head = t.reshape(n_heads, parts, -1, *t.shape[1:])
    return per_head[:, part].reshape(-1, *t.shape[1:])


def _fuse(parts: list[np.ndarray], n_heads: int) -> np.ndarray:
    """Inverse of _unfuse over all parts (HF orientation, output dimension first)."""
    per_head = [p.reshape(n_heads, 1, -1, *p.shape[1:]) for p in parts]
    return np.concatenate(per_head, axis=1).reshape(-1, *parts[0].shape[1:])


def hf_to_params(get: Callable[[str], np.ndarray], cfg: Config, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (our path, array) one parameter at a time from HF tensors fetched by `get(key)`."""
    specs = param_specs(cfg)

    def convert(w: Weight, key: str, axes: tuple) -> np.ndarray:
        t = _unfuse(get(key), w, cfg.n_heads)
        return pad_vocab(t.T if w.transpose else t, axes, cfg)

    for w in _table(cfg):
        spec = spec_at(specs, w.ours)
        if "{i}" in w.hf:
            out = np.empty(spec.shape, dtype)
            for i in range(cfg.layers):
                out[i] = convert(w, w.hf.format(i=i), spec.axes[1:])
        else:
            out = convert(w, w.hf, spec.axes).astype(dtype)
        if out.shape != spec.shape:
            raise ValueError(f"HF tensor {w.hf} converts to shape {out.shape}, expected {spec.shape} for {w.ours}")
        yield w.ours, out


def _groups(cfg: Config) -> list[list[Weight]]:
    """Table rows grouped by HF tensor (several rows for a fused tensor), in table order."""
    groups: dict[str, list[Weight]] = {}
    for w in _table(cfg):
        groups.setdefault(w.hf, []).append(w)
    return list(groups.values())


def params_to_hf(get: Callable[[str], np.ndarray], cfg: Config, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF key, array) from our parameters fetched by `get(path)`, one HF tensor group at a time."""
    specs = param_specs(cfg)
    for group in _groups(cfg):
        ours = [_unpad_vocab(np.asarray(get(w.ours)), spec_at(specs, w.ours).axes, cfg) for w in group]
        layers = range(cfg.layers) if "{i}" in group[0].hf else [None]
        for i in layers:
            parts = [(a if i is None else a[i]) for a in ours]
            parts = [p.T if w.transpose else p for p, w in zip(parts, group)]
            t = _fuse(parts, cfg.n_heads) if group[0].fused else parts[0]
            key = group[0].hf if i is None else group[0].hf.format(i=i)
            yield key, np.ascontiguousarray(t).astype(dtype)


# --- HF directories ------------------------------------------------------------

def is_hf_dir(path: PathLike) -> bool:
    path = user_path(path)
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()


def read_hf_config(path: PathLike) -> dict[str, Any]:
    return json.loads((user_path(path) / "config.json").read_text())


INDEX = "model.safetensors.index.json"


class HFTensors:
    """Random access to the tensors of an HF directory, read lazily one at a time (safetensors'
    `safe_open`, which validates each file's header: offsets, overlaps, dtypes). A tensor whose
    shape is not the one `cfg` implies (see `hf_shapes`) is refused before it is read."""

    def __init__(self, path: PathLike, cfg: Config, allow_pickle: bool = False):
        path = user_path(path)
        self.shapes = hf_shapes(cfg)
        self.files: dict[str, tuple[epath.Path, Any]] = {}  # key -> (file, open handle)
        if (path / INDEX).is_file():  # a sharded checkpoint: its index names every tensor's file
            weight_map = json.loads((path / INDEX).read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path / INDEX} has no 'weight_map' object")
            shards = [path / name for name in sorted(set(weight_map.values()))]
        else:
            shards = sorted(path.glob("*.safetensors"))
        for shard in shards:
            try:
                handle = safetensors.safe_open(str(shard), framework="numpy")
            except (safetensors.SafetensorError, OSError) as e:
                culprit = _culprit(shard)
                raise ValueError(f"{shard}: not a valid safetensors file ({culprit + ': ' if culprit else ''}{e})") from None
            for key in handle.keys():
                if key in self.files:
                    raise ValueError(f"tensor '{key}' is in both {self.files[key][0]} and {shard}")
                self.files[key] = (shard, handle)
        self.state: dict[str, Any] = {}
        if not self.files:
            bin_path = path / "pytorch_model.bin"
            if not bin_path.is_file():
                raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin in {path}")
            if not allow_pickle:
                raise ValueError(f"{path} holds only pytorch_model.bin, a pickle that can run code when loaded; "
                                 "pass --allow-pickle if you trust it")
            import torch

            self.state = torch.load(bin_path, map_location="cpu", mmap=True, weights_only=True)

    def __call__(self, key: str) -> np.ndarray:
        if key in self.files:
            where, handle = self.files[key]
            self._check(key, where, tuple(handle.get_slice(key).get_shape()))
            try:
                return handle.get_tensor(key).astype(np.float32)
            except (safetensors.SafetensorError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: tensor '{key}' cannot be read ({e})") from None
        if key in self.state:
            self._check(key, "pytorch_model.bin", tuple(self.state[key].shape))
            return self.state[key].float().numpy()
        raise KeyError(f"tensor '{key}' missing from the HF checkpoint")

    def _check(self, key: str, where: Any, shape: tuple[int, ...]) -> None:
        expected = self.shapes.get(key)
        if expected is not None and shape != tuple(expected):
            raise ValueError(f"{where}: tensor '{key}' has shape {list(shape)}, but config.json implies "
                             f"{list(expected)}")


ITEMSIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _culprit(path: epath.Path) -> str:
    """Which tensor of a safetensors file that `safe_open` refused is at fault, for the error message
    (the library says what is wrong, not where); "" when that cannot be told."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100 << 20)))
        data_bytes = path.stat().length - 8 - n
    except (OSError, ValueError, struct.error):
        return ""
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            (begin, end), shape, width = info["data_offsets"], info["shape"], ITEMSIZES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor '{name}' has no dtype, shape and data_offsets"
        if width is None:
            return f"tensor '{name}' has an unknown dtype {info['dtype']!r}"
        if not 0 <= begin <= end <= data_bytes:
            return f"tensor '{name}' lies at bytes {begin}-{end} of {data_bytes}"
        if math.prod(shape) * width != end - begin:
            return f"tensor '{name}' of {info['dtype']}{shape} does not fill its {end - begin} bytes"
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            return f"tensors '{first}' and '{second}' overlap"
    return ""


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The HF tensors an export writes, with their shapes, derived from the same table."""
    specs = param_specs(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for group in _groups(cfg):
        spec = spec_at(specs, group[0].ours)
        shape = tuple(cfg.n_vocab if a == "vocab" else n for n, a in zip(spec.shape, spec.axes))
        per_layer = "{i}" in group[0].hf
        shape = shape[1:] if per_layer else shape
        shape = shape[::-1] if group[0].transpose else shape
        shape = (shape[0] * len(group), *shape[1:])  # fused parts stack on the output dimension
        for key in ([group[0].hf.format(i=i) for i in range(cfg.layers)] if per_layer else [group[0].hf]):
            shapes[key] = shape
    return shapes


# --- files ---------------------------------------------------------------------

EXPORT_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def parse_size(size: int | str) -> int:
    """Bytes of a size as transformers' max_shard_size writes it: 5000000, "500MB", "5GB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.I)
    if not match:
        raise ValueError(f"a size is a number of bytes or a number with KB, MB, GB, KiB, MiB or GiB, got '{size}'")
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def write_shards(out: epath.Path, shapes: dict[str, tuple[int, ...]], dtype: np.dtype,
                 tensors: Iterator[tuple[str, np.ndarray]], max_shard_size: int | str) -> None:
    """Tensors (arriving in `shapes`' order) as model.safetensors, or, past `max_shard_size` bytes,
    as model-0000i-of-0000n.safetensors files with model.safetensors.index.json (transformers' layout).
    Shards are planned from the shapes first, so only one shard's tensors are held at a time."""
    limit = parse_size(max_shard_size)
    plan: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if plan[-1] and size + nbytes > limit:  # (a tensor larger than the limit gets a shard of its own)
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    shard_of = {key: i for i, keys in enumerate(plan) for key in keys}
    held: dict[str, np.ndarray] = {}
    for key, array in tensors:
        held[key] = array
        keys = plan[shard_of[key]]
        if all(k in held for k in keys):
            safetensors.numpy.save_file({k: held.pop(k) for k in keys}, str(out / names[shard_of[key]]),
                                        metadata={"format": "pt"})
    if len(plan) > 1:
        total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[shard_of[k]] for k in shapes}}
        (out / INDEX).write_text(json.dumps(index, indent=2))
