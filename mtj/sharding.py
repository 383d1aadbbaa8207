"""The device mesh and the one table that decides all sharding.

Parameters and activations are annotated with logical axis names; `RULES`
maps each logical axis to a mesh axis ('dp' data parallel, 'mp' tensor
parallel) or None (replicated). `fsdp` additionally splits parameters over dp.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtj.ops import matmul_f32

# Megatron-style tensor parallelism: attention is split by heads, the MLP by
# hidden units, embeddings and LM head by vocabulary. Everything else is
# replicated over mp; activations are split over dp along the batch.
RULES: dict[str, str | None] = {
    "batch": "dp",
    "vocab": "mp",
    "heads": "mp",
    "mlp": "mp",
    "embed": None,
    "layers": None,
    "lora": None,  # an adapter's rank (mtj.lora)
    "norm": None,
    "seq": None,
    "head_dim": None,
}
FSDP_RULES = {**RULES, "embed": "dp"}  # ZeRO-3: the model dimension of weights also over dp


def rules(fsdp: bool = False) -> dict[str, str | None]:
    return FSDP_RULES if fsdp else RULES


def make_mesh(mp: int = 1, dp: int | None = None, devices: list | None = None) -> Mesh:
    """A ('dp', 'mp') mesh; dp defaults to all remaining devices."""
    devices = list(jax.devices()) if devices is None else list(devices)
    if dp is None:
        if len(devices) % mp:
            raise ValueError(f"cores_per_replica (mp)={mp} does not divide the {len(devices)} available devices")
        dp = len(devices) // mp
    if dp * mp > len(devices):
        raise ValueError(f"mesh dp={dp} x mp={mp} needs {dp * mp} devices but only {len(devices)} are available")
    grid = np.array(devices[: dp * mp]).reshape(dp, mp)
    return Mesh(grid, ("dp", "mp"), axis_types=(AxisType.Auto, AxisType.Auto))


def spec(axes: tuple[str | None, ...], fsdp: bool = False) -> P:
    table = rules(fsdp)
    return P(*(table[a] if a is not None else None for a in axes))


def named(mesh: Mesh, axes: tuple[str | None, ...], fsdp: bool = False) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, fsdp))


def place(items: Iterable[tuple[str, np.ndarray]], shardings: Any, dtype: Any) -> dict:
    """Put (dot-separated path, numpy array) pairs onto devices, each with its sharding in the nested dict
    `shardings` (`mtj.model.param_shardings`) and cast to `dtype`, one at a time (host memory holds one
    array at most); the nested dict."""
    tree: dict = {}
    for path, array in items:
        *parents, leaf = path.split(".")
        node, sharding = tree, shardings
        for part in parents:
            node, sharding = node.setdefault(part, {}), sharding[part]
        node[leaf] = jax.device_put(array.astype(dtype), sharding[leaf])
    return tree


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Sharding constraint by logical axes, under the mesh set with `jax.set_mesh` (no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(axes))


def row_parallel_sum(pairs: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """sum_i x_i @ w_i in fp32, where each contraction axis is split over mp.

    GSPMD would all-reduce after every matmul; summing the per-device partial
    products first and reducing once halves the traffic of a parallel block.
    """
    def local(*flat: jax.Array) -> jax.Array:
        return sum(matmul_f32(x, w) for x, w in zip(flat[::2], flat[1::2]))

    flat = [a for pair in pairs for a in pair]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("mp", 1) == 1:
        return local(*flat)
    x_spec = P(*([None] * (pairs[0][0].ndim - 1)), "mp")
    # (a quantized kernel's scales are split with its rows where they have rows: int4's groups)
    w_specs = [jax.tree.map(lambda a: P("mp", None) if a.shape[0] > 1 else P(), w) for _, w in pairs]
    return jax.shard_map(
        lambda *a: jax.lax.psum(local(*a), "mp"),
        in_specs=tuple(spec for w_spec in w_specs for spec in (x_spec, w_spec)), out_specs=P(), axis_names={"mp"},
    )(*flat)
