"""Decode-step matmuls on CPU that read int8 or bf16 kernels as they are stored (cpu_matmul.cc, an XLA FFI
custom call): XLA:CPU converts such a kernel to fp32 whole before its dot, so a quantized or bf16 model
decoded no faster than fp32 (docs/serving.md). The library is compiled for this CPU at first use (g++,
AVX-512 VNNI and BF16) and cached; without them decoding keeps XLA's dot.

A kernel is packed once, in the decode layout (`mtj.decode.layout`), into `PackedKernel`: int8 kernels with
a scale per output channel (`mtj.quantize`) and bf16 kernels, on one device. `matmul` runs the custom call
for the few rows of a decode step and XLA's dot on the unpacked kernel for a long prefill.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
from etils import epath
from flax import struct

from mtj import platforms
from mtj.paths import user_path
from mtj.quantize import QArray, is_quantized

SOURCE = user_path(__file__).parent / "cpu_matmul.cc"
PANEL = 128  # columns per contiguous panel of a packed kernel (cpu_matmul.cc's kPanel)
MAX_ROWS = 64  # more rows than this (a prefill) run XLA's dot on the unpacked kernel
FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")  # what cpu_matmul.cc's instructions need
COMPILE = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


@struct.dataclass
class PackedKernel:
    """A [k, n] matmul kernel in cpu_matmul.cc's layout: int8 [n/128, k/4, 128, 4] with fp32 scales and
    int32 column sums (both [n padded]), or bf16 [n/128, k/2, 128, 2]."""
    weights: jax.Array
    scale: jax.Array | None
    colsum: jax.Array | None
    k: int = struct.field(pytree_node=False)
    n: int = struct.field(pytree_node=False)

    def __getitem__(self, index: object) -> PackedKernel:  # NNX reads a variable's value as value[...]
        if index is not Ellipsis:
            raise TypeError("a PackedKernel is read whole (value[...])")
        return self


def is_packed(w: object) -> bool:
    return isinstance(w, PackedKernel)


def enabled(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> bool:
    """Whether kernels are packed for `mesh`: one device on a CPU with mtj's CPU kernels on, and the library
    built (its first call compiles it)."""
    return mesh.size <= 1 and platforms.cpu_kernels() and _library() is not None


def packable(w: object) -> bool:
    """An int8 kernel with one scale per output channel, or a bf16 kernel."""
    if is_quantized(w):
        return w.qtype == jnp.int8 and w.ndim == 2 and w.scale.shape[0] == 1
    return isinstance(w, jax.Array) and w.dtype == jnp.bfloat16 and w.ndim == 2


def pack(w: jax.Array | QArray) -> PackedKernel:
    if is_quantized(w):
        return _pack_int8(w.qvalue, w.scale)
    return _pack_bf16(w)


def _panels(w: jax.Array, rows: int) -> jax.Array:
    """[k, n] -> [n/128, k/rows, 128, rows], zero-padded."""
    k, n = w.shape
    w = jnp.pad(w, ((0, -k % rows), (0, -n % PANEL)))
    return w.reshape(w.shape[0] // rows, rows, w.shape[1] // PANEL, PANEL).transpose(2, 0, 3, 1)


@jax.jit
def _pack_int8(qvalue: jax.Array, scale: jax.Array) -> PackedKernel:
    pad = (0, -qvalue.shape[1] % PANEL)
    return PackedKernel(_panels(qvalue, 4), jnp.pad(scale[0].astype(jnp.float32), pad),
                        jnp.pad(qvalue.astype(jnp.int32).sum(0), pad), *qvalue.shape)


@jax.jit
def _pack_bf16(w: jax.Array) -> PackedKernel:
    return PackedKernel(_panels(w, 2), None, None, *w.shape)


def unpack(w: PackedKernel) -> jax.Array:
    """The [k, n] kernel (int8 values or bf16)."""
    panels, kq, _, rows = w.weights.shape
    return w.weights.transpose(1, 3, 0, 2).reshape(kq * rows, panels * PANEL)[: w.k, : w.n]


def matmul(x: jax.Array, w: PackedKernel) -> jax.Array:
    """x [..., k] @ w in fp32: the custom call for up to MAX_ROWS rows, else XLA's dot."""
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS or rows == 0:
        y = jnp.einsum("...i,io->...o", x, unpack(w).astype(x.dtype), preferred_element_type=jnp.float32)
        return y if w.scale is None else y * w.scale[: w.n]
    flat = x.reshape(rows, w.k).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((rows, w.weights.shape[0] * PANEL), jnp.float32)
    if w.scale is None:
        y = jax.ffi.ffi_call("mtj_matmul_bf16", out)(flat, w.weights)
    else:
        y = jax.ffi.ffi_call("mtj_matmul_int8", out)(flat, w.weights, w.scale, w.colsum)
    return y[:, : w.n].reshape(*x.shape[:-1], w.n)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """cpu_matmul.cc built for this CPU (cached by source, JAX version and CPU flags) with its custom calls
    registered; None, with one warning, where it cannot be."""
    missing = [f for f in FLAGS if f not in platforms.cpu_flags()]
    if missing:
        return None  # (not a failure: this CPU decodes through XLA's dot)
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        warnings.warn(f"mtj's CPU matmul kernels could not be built ({detail}); int8 and bf16 decoding on CPU "
                      "fall back to XLA's dot (several times slower). Install g++ (or set CXX) to build them.")
        return None
    for name in ("mtj_matmul_int8", "mtj_matmul_bf16"):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def _build() -> epath.Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise OSError(f"no C++ compiler '{compiler}' on PATH")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jax.__version__.encode(), " ".join(COMPILE).encode(),
                                     " ".join(sorted(platforms.cpu_flags())).encode()])).hexdigest()[:16]
    cache = user_path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "mtj"
    library = cache / f"cpu_matmul-{key}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: processes may race
            built = user_path(tmp) / library.name
            subprocess.run([compiler, *COMPILE, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                           check=True, capture_output=True, text=True)
            os.replace(built, library)
    return library
