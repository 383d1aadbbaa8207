"""Fused causal attention kernels for full sequences (training, evaluation): cuDNN flash attention on GPU
through `jax.nn.dot_product_attention`, Pallas splash attention on TPU. Neither materialises the [B, H, T, T]
scores. Packed sequences (several documents per row) attend within their document: splash takes their
segment ids, cuDNN a [B, T, T] mask of them. The model's own einsum attention (`mtj.model.Attention`) stays the path for CPUs, for decoding with a
KV cache and for left-padded batches.

Off their platform the kernels run as references: `jax.nn.dot_product_attention`'s XLA implementation for
"cudnn", Pallas interpret mode for "splash" (slow; what the CPU tests compare against the einsum path).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from mtj import platforms
from mtj.config import Config, ConfigError

SPLASH_BLOCK = 512  # the largest query/key tile; a sequence must be a multiple of the tile used


def _tpu_before_v4() -> bool:
    """TPU v2/v3: Mosaic refuses bf16 matmuls in a kernel there ("Unsupported matmul RHS type", libtpu 0.0.52)
    and compiles fp32 ones."""
    return platforms.device_kind().startswith(("TPU v2", "TPU v3"))


def implementation(cfg: Config, seq: int) -> str:
    """The attention a full sequence of `seq` tokens runs: the config's `attention`, with "auto" the platform's
    kernel where there is one ("cudnn" on CUDA GPUs where it takes the shape, "splash" on TPU v4 and later),
    else "xla".
    On TPU v2/v3 `attention=splash` runs the kernel on fp32 operands: slower matmuls than XLA's bf16 ones, but
    no [B, H, T, T] scores in memory; so there `auto` keeps XLA and splash is the memory choice."""
    choice, native = cfg.attention, platforms.platform().fused_attention
    cudnn = native == "cudnn" and cudnn_takes(cfg.head_dim, cfg.dtype, platforms.cuda_compute_capability())
    if choice == "auto":
        choice = "cudnn" if cudnn else "splash" if native == "splash" and not _tpu_before_v4() else "xla"
    if choice == "cudnn" and native == "cudnn" and not cudnn:
        raise ConfigError(
            f"attention 'cudnn': cuDNN flash attention on this GPU (CUDA compute capability "
            f"{platforms.cuda_compute_capability() or 'none: not CUDA'}) takes bf16/fp16 with head dims that are multiples of 8, "
            f"up to 256 from Hopper (9.0) on and 128 before; this model has dtype {cfg.dtype} and head dim "
            f"{cfg.head_dim}. Set attention=auto or xla")
    return "xla" if choice == "splash" and not _splash_block(seq) else choice


def cudnn_takes(head_dim: int, dtype: str, compute_capability: str | None) -> bool:
    """Whether cuDNN's flash attention runs this shape (JAX's own check, `check_is_flash_attention`): 16-bit
    compute, a head dim that is a multiple of 8 and at most 256 on Hopper and later, 128 before (so GPT-J-6B's
    256 is XLA's on an A100). `compute_capability` None: not a CUDA GPU (ROCm has no cuDNN)."""
    if compute_capability is None or dtype not in ("bfloat16", "float16"):
        return False
    hopper = int(compute_capability.split(".")[0]) >= 9
    return head_dim % 8 == 0 and head_dim <= (256 if hopper else 128)


def _splash_block(seq: int) -> int:
    """The tile splash runs `seq` tokens in (it must divide them and be a multiple of 128), or 0: none fits."""
    block = math.gcd(seq, SPLASH_BLOCK)
    return block if block % 128 == 0 else 0


class Segments(NamedTuple):
    """A packed batch's document of each token, [B, T] (tokens attend to earlier tokens of their own document)."""

    ids: jax.Array


def fused(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str, scale: float, window: int | None,
          segments: Segments | None = None) -> jax.Array:
    """Causal attention of q, k, v [B, T, H, Dh] -> [B, T, H, Dh]; `window`: keys within window-1 positions
    before the query only (GPT-Neo's local layers); `segments`: within each token's document only."""
    interpret = platforms.platform().fused_attention != kernel  # off its platform: the reference
    if kernel == "cudnn":
        same = None if segments is None else (segments.ids[:, :, None] == segments.ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(
            q, k, v, mask=same, scale=scale, is_causal=True,
            local_window_size=None if window is None else (window - 1, 0), implementation="xla" if interpret else "cudnn")
    return _splash(q, k, v, scale, window, interpret, segments)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, window: int | None, interpret: bool,
            segments: Segments | None) -> jax.Array:
    B, T, H, Dh = q.shape
    block = _splash_block(T)

    operands = jnp.float32 if _tpu_before_v4() else q.dtype

    # without segments the kernel runs as before: no segment ids to compare
    args = (q, k, v) if segments is None else (q, k, v, segments.ids.astype(jnp.int32))

    def per_device(q: jax.Array, k: jax.Array, v: jax.Array, *ids: jax.Array) -> jax.Array:
        kernel = _splash_kernel(T, q.shape[2], block, window, interpret)
        # [b, h, T, Dh]: the kernel's layout
        heads_major = lambda x: x.transpose(0, 2, 1, 3).astype(operands)  # noqa: E731
        attend = kernel if not ids else lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))
        out = jax.vmap(attend)(heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v), *ids)
        return out.transpose(0, 2, 1, 3).astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_device(*args)
    # A Pallas kernel sees one device's block: batch over dp, heads over mp (as RULES place them).
    rows = "dp" if B % mesh.shape["dp"] == 0 else None
    specs = (P(rows, None, "mp", None),) * 3 + (P(rows, None),) * (len(args) - 3)
    return jax.shard_map(per_device, in_specs=specs, out_specs=specs[0], axis_names={"dp", "mp"},
                         check_vma=False)(*args)


def _splash_kernel(seq: int, heads: int, block: int, window: int | None, interpret: bool) -> splash.SplashAttentionKernel:
    # Made per trace, not cached: it holds its mask tables as arrays of the trace that made it.
    shape = (seq, seq)
    mask = splash_mask.CausalMask(shape) if window is None else splash_mask.LocalMask(shape, (window - 1, 0), 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash_mask.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
