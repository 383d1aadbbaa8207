"""Decoding kernels for XLA:CPU, where they were measured; the generator and the slot engine use
them behind `enabled()` (the generic path, which TPUs and GPUs run, is plain JAX in mtj.decode).

- `blocked_argmax`: XLA:CPU's argmax of a 50k-wide row (a variadic reduce) costs ~5x a max per
  block followed by the argmax within the winning block.
- `screened_argmax`: greedy decoding of fp32 models reads the LM head in bf16 (half the bytes)
  with a rigorous error bound, and recomputes only the candidate blocks in fp32; `screened_loop` runs
  the decode steps around it, the full head taking the steps it cannot decide.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mtj import platforms
from mtj.config import Config
from mtj.model import Params, output_head


def enabled() -> bool:
    """Whether the CPU kernels are used: on the CPU backend, unless MTJ_CPU_KERNELS=0 (to measure them)."""
    return platforms.cpu_kernels()


def blocked_argmax(x: jax.Array) -> jax.Array:
    """Index of the first largest value of each row of x [B, V], int32.

    The largest value of each block of the row, then the argmax within the
    winning block: XLA:CPU's argmax of a 50k-wide row (a variadic reduce) costs
    ~5x this, which matters when it runs once per decoded token."""
    B, V = x.shape
    block = max(d for d in range(1, 257) if V % d == 0)
    if block < 32:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    blocks = x.reshape(B, V // block, block)
    which = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    within = jnp.argmax(jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0], axis=-1)
    return (which * block + within).astype(jnp.int32)


# Greedy decoding screens the fp32 LM head in bf16 (see `screened_argmax`): the
# vocabulary in blocks of SCREEN_BLOCK columns, SCREEN_CANDIDATES blocks recomputed exactly.
SCREEN_BLOCK, SCREEN_CANDIDATES = 32, 8


def has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Linux: the amx_bf16 flag in /proc/cpuinfo)."""
    return "amx_bf16" in platforms.cpu_flags()


def screens(cfg: Config, mesh: jax.sharding.Mesh) -> bool:
    """Whether greedy decoding uses `screened_argmax`: fp32 models on one vocabulary shard on a CPU
    with AMX, with a vocabulary large enough that the candidate blocks are a small part of it.
    (Measured: on a 2-core Xeon with AMX the screen paid; on a 2-core EPYC with avx512_bf16 but no
    AMX fp32 greedy decoding ran faster without it, 517 vs 372 tokens/s at batch 1.)"""
    return (cfg.dtype == "float32" and cfg.quantize == "none" and mesh.shape.get("mp", 1) == 1
            and cfg.padded_vocab % SCREEN_BLOCK == 0 and cfg.padded_vocab >= 2 * SCREEN_BLOCK * SCREEN_CANDIDATES
            and enabled() and has_amx())


def screen_head(params: Params, cfg: Config) -> Params:
    """What `screened_argmax` reads, computed once per model (1.5x the head's memory):
    the head in bf16, transposed with its columns ordered block-minor, so a block's
    maximum is a reduction over a leading axis; per block the largest column norms
    that bound the bf16 error; the fp32 head transposed, so a block of columns is
    contiguous."""
    kernel, bias = output_head(params, cfg)
    kernel = kernel.astype(jnp.float32)
    low = kernel.astype(jnp.bfloat16)
    w_norm = jnp.linalg.norm(kernel, axis=0)
    dw_norm = jnp.linalg.norm(kernel - low.astype(jnp.float32), axis=0)
    accumulation = 1.01 * cfg.d_model * 2.0 ** -24  # fp32 rounding of a d_model-long sum, relative
    blocks = cfg.padded_vocab // SCREEN_BLOCK
    real_bias = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.n_vocab, bias, 0.0)  # not the padding's -1e30

    def block_max(a: jax.Array) -> jax.Array:
        return jnp.max(a.reshape(blocks, SCREEN_BLOCK), axis=-1)

    return {"screen": low.T.reshape(blocks, SCREEN_BLOCK, -1).swapaxes(0, 1).reshape(low.shape[::-1]),
            "screen_bias": bias.reshape(blocks, SCREEN_BLOCK).T.reshape(-1),
            "w_norm": block_max(w_norm), "dw_norm": block_max(dw_norm + accumulation * (w_norm + dw_norm)),
            "magnitude": block_max(w_norm + dw_norm), "bias_magnitude": block_max(jnp.abs(real_bias)),
            "kernel_t": kernel.T, "bias": bias}


def screened_argmax(x: jax.Array, head: Params) -> tuple[jax.Array, jax.Array]:
    """(argmax of the fp32 logits x @ kernel + bias per row of x [B, d], whether that is certain).

    The logits are computed in bf16 (half the bytes of the fp32 head) with a
    rigorous error bound per block of columns: |x.w - xb.wb| <= |dx||w| + |xb||dw|
    plus the fp32 accumulation error, with each block's largest |w| and |dw|. The
    SCREEN_CANDIDATES blocks with the largest upper bounds are recomputed in fp32;
    when their best logit beats every other block's upper bound it is the argmax
    (to fp32 rounding, as a full fp32 head gives it); when not (near-ties,
    non-finite values) the caller must use the full head."""
    B, d = x.shape
    V = head["bias"].shape[0]
    blocks = V // SCREEN_BLOCK
    low = x.astype(jnp.bfloat16)
    dx_norm = jnp.linalg.norm(x - low.astype(jnp.float32), axis=-1, keepdims=True)
    low_norm = jnp.linalg.norm(low.astype(jnp.float32), axis=-1, keepdims=True)
    # [V, B], the vocabulary on the left: XLA:CPU's bf16 (AMX) dot then reads the head
    # as it is stored, where with the head on the right it repacks all of it every call.
    # (A single row goes in twice: XLA:CPU's bf16 dot of one column is 1.6x slower than of two.)
    rows = jnp.concatenate([low, low]) if B == 1 else low
    approx = jax.lax.dot_general(head["screen"], rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    approx = approx[:, :B]
    block_max = jnp.max((approx + head["screen_bias"][:, None]).reshape(SCREEN_BLOCK, blocks, B), axis=0).T
    error = ((dx_norm * head["w_norm"] + low_norm * head["dw_norm"]) * 1.001
             + (low_norm * head["magnitude"] + head["bias_magnitude"]) * 2.0 ** -20 + 1e-30)  # [B, blocks]
    block_upper = block_max + error
    # Every other block's bound is at most the smallest chosen one. (Using top_k's
    # values, not just its indices, turns XLA:CPU's fast TopK into a full sort.)
    chosen = jnp.sort(jax.lax.top_k(block_upper, SCREEN_CANDIDATES)[1], axis=-1)  # ascending: ties go first
    others_bound = jnp.min(jnp.take_along_axis(block_upper, chosen, axis=1), axis=-1)
    width = SCREEN_CANDIDATES * SCREEN_BLOCK
    kernel = jnp.take(head["kernel_t"].reshape(blocks, SCREEN_BLOCK * d), chosen, axis=0).reshape(B, width, d)
    exact = jnp.einsum("bd,bcd->bc", x, kernel, preferred_element_type=jnp.float32)
    exact = exact + jnp.take(head["bias"].reshape(blocks, SCREEN_BLOCK), chosen, axis=0).reshape(B, width)
    best = jnp.argmax(exact, axis=-1)
    token = jnp.take_along_axis(chosen, best[:, None] // SCREEN_BLOCK, axis=1)[:, 0] * SCREEN_BLOCK
    token = (token + best % SCREEN_BLOCK).astype(jnp.int32)
    return token, jnp.all(jnp.max(exact, axis=-1) > others_bound)


def screened_loop(running: Callable[[Any], jax.Array], step: Callable[[Any], Any], full_head: Callable[[Any], Any],
                  state: Any) -> Any:
    """`step` (which screens each token and sets `state.retry` where it could not decide) while `running`,
    `full_head` taking each undecided step. XLA:CPU runs a while loop with a conditional in it ~2 ms a step
    slower, so an undecided screen ends the screened loop instead, and the full head decides that step (from
    its kept hidden state and cache) in an enclosing loop that runs only then (the first screened loop is
    outside it: no full head per phase)."""
    def screened(state: Any) -> Any:
        return jax.lax.while_loop(lambda s: running(s) & ~s.retry, step, state)

    return jax.lax.while_loop(lambda s: s.retry, lambda s: screened(full_head(s)), screened(state))
