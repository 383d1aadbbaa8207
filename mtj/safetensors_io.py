"""The safetensors format read by memory map and written as a stream.

Own code rather than the `safetensors` package so that bf16 works with numpy
(via ml_dtypes) and a file is written one tensor at a time: the header is
computed from the shapes first, then each tensor is appended and freed.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from mtj.paths import PathLike, user_path

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    def __init__(self, path: PathLike):
        self.path = user_path(path)  # a local file: it is memory-mapped
        with self.path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > os.path.getsize(self.path) - 8:
                raise ValueError(f"{self.path}: header length {n} runs past the end of the file (truncated?)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        begin, end = info["data_offsets"]
        buf = self._mmap[self.data_start + begin: self.data_start + end]
        return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: PathLike, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (given as an iterator, in any order) whose names/shapes/dtypes are known up front.

    The caller is responsible for atomicity (write into a temporary directory, then rename).
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written: set[str] = set()
    with user_path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        data_start = f.tell()
        for name, a in tensors:
            info = header[name]
            if tuple(a.shape) != tuple(info["shape"]) or NAMES[a.dtype] != info["dtype"]:
                raise ValueError(f"tensor {name}: got {a.dtype}{a.shape}, header says {info['dtype']}{info['shape']}")
            f.seek(data_start + info["data_offsets"][0])
            f.write(np.ascontiguousarray(a).tobytes())
            written.add(name)
    missing = set(shapes) - written
    if missing:
        raise ValueError(f"tensors declared but never written: {sorted(missing)[:5]}")


def read_all(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    f = SafetensorsFile(path)
    for key in f.keys():
        yield key, f.get(key)
