"""Original Mesh Transformer JAX (v1) checkpoints -> mtj, as a table.

A v1 step directory holds `shard_{s}/{0..15}.npz` for each of the
`cores_per_replica` model shards: the leaves of `jax.tree_flatten` of the
train state ({"opt_state" (absent in slim checkpoints), "params", "step"}, keys
sorted), in order, split over the 16 files as `arr_0, arr_1, ...`, each leaf
one shard's slice. bfloat16 leaves were saved as raw 2-byte voids. The params
are haiku modules, flattened in sorted name order; `LAYER` and `OUTER` say
where each one goes in our tree and how its shards join.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from tqdm import tqdm

from mtj.config import Config
from mtj.convert import pad_vocab, spec_at
from mtj.model import param_specs
from mtj.paths import PathLike, user_path

FILES_PER_SHARD = 16
PREFIX = "causal_transformer_shard/~/"


@dataclasses.dataclass(frozen=True)
class V1Param:
    module: str  # haiku module name (under PREFIX; "{i}" is the layer index)
    name: str  # haiku parameter name
    ours: str  # our parameter path; rows with the same path are added (the embedding's bias)
    join: str  # how shards join: "out" concat on the last axis, "in" on the first, "sum", "same" (replicated)


# In creation order the layer's linears are q, v, k, out, fc_in, fc_out (haiku numbers them so).
LAYER = [
    V1Param("layer_{i}/~/linear", "w", "layers.attn.q", "out"),
    V1Param("layer_{i}/~/linear_1", "w", "layers.attn.v", "out"),
    V1Param("layer_{i}/~/linear_2", "w", "layers.attn.k", "out"),
    V1Param("layer_{i}/~/linear_3", "w", "layers.attn.o", "in"),
    V1Param("layer_{i}/~/linear_4", "b", "layers.mlp.fc_in_bias", "out"),
    V1Param("layer_{i}/~/linear_4", "w", "layers.mlp.fc_in", "out"),
    V1Param("layer_{i}/~/linear_5", "b", "layers.mlp.fc_out_bias", "sum"),  # each shard adds its bias before the psum
    V1Param("layer_{i}/~/linear_5", "w", "layers.mlp.fc_out", "in"),
    V1Param("layer_{i}/~/replicated_layer_norm", "offset", "layers.ln_1.bias", "same"),
    V1Param("layer_{i}/~/replicated_layer_norm", "scale", "layers.ln_1.scale", "same"),
]
OUTER = [
    # the embedding is a one-hot matmul over each shard's slice of the vocabulary, psummed
    V1Param("embedding_shard/~/linear", "b", "wte", "sum"),
    V1Param("embedding_shard/~/linear", "w", "wte", "in"),
    V1Param("projection_shard/~/linear", "b", "lm_head.bias", "out"),
    V1Param("projection_shard/~/linear", "w", "lm_head.kernel", "out"),
    V1Param("projection_shard/~/replicated_layer_norm", "offset", "ln_f.bias", "same"),
    V1Param("projection_shard/~/replicated_layer_norm", "scale", "ln_f.scale", "same"),
]


def _haiku_key(row: V1Param, layer: int | None) -> tuple[str, str]:
    return PREFIX + row.module.format(i=layer), row.name


def param_order(cfg: Config) -> list[tuple[V1Param, int | None]]:
    """(row, layer) for every v1 params leaf, in the checkpoint's order (haiku modules sorted by name)."""
    rows = [(r, None) for r in OUTER] + [(r, i) for i in range(cfg.layers) for r in LAYER]
    return sorted(rows, key=lambda item: _haiku_key(*item))


def _leaf_name(row: V1Param, layer: int | None) -> str:
    return "/".join(_haiku_key(row, layer))


class V1Shards:
    """Lazy access to leaf n of every model shard of a v1 step directory (nothing is read until asked)."""

    def __init__(self, step_dir: PathLike, shards: int):
        step_dir = user_path(step_dir)
        if not step_dir.is_dir():
            raise FileNotFoundError(f"v1 checkpoint directory {step_dir} does not exist")
        self.shards: list[list[tuple[Any, str]]] = []  # per shard: (open npz, key) per leaf
        for s in range(shards):
            leaves = []
            for f in range(FILES_PER_SHARD):
                path = step_dir / f"shard_{s}" / f"{f}.npz"
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: a v1 step directory has shard_0..shard_{shards - 1} "
                                            f"(cores_per_replica={shards} in --config), each with "
                                            f"0..{FILES_PER_SHARD - 1}.npz")
                npz = np.load(path.open("rb"))  # leaves are read lazily, from a bucket too
                leaves += [(npz, k) for k in sorted(npz.files, key=lambda k: int(k.split("_")[-1]))]
            self.shards.append(leaves)
        counts = {len(leaves) for leaves in self.shards}
        if len(counts) != 1:
            raise ValueError(f"the shards of {step_dir} hold different numbers of arrays ({sorted(counts)}): "
                             "the checkpoint is incomplete or mixes steps")
        self.count = counts.pop()

    def leaf(self, n: int) -> list[np.ndarray]:
        out = []
        for leaves in self.shards:
            npz, key = leaves[n]
            a = npz[key]
            out.append(a.view(ml_dtypes.bfloat16) if a.dtype == np.dtype("V2") else a)
        return out


def _join(parts: list[np.ndarray], join: str) -> np.ndarray:
    if join == "out":
        return np.concatenate(parts, axis=-1)
    if join == "in":
        return np.concatenate(parts, axis=0)
    if join == "sum":
        return np.sum([p.astype(np.float32) for p in parts], axis=0)
    return parts[0]  # replicated


def v1_to_params(shards: V1Shards, cfg: Config) -> Iterator[tuple[str, np.ndarray]]:
    """(our path, float32 array) per parameter, read one v1 leaf (all its shards) at a time."""
    order = param_order(cfg)
    first = shards.count - 1 - len(order)  # the params sit just before the final `step` leaf
    if first < 0 or shards.leaf(shards.count - 1)[0].shape != ():
        raise ValueError(f"the checkpoint holds {shards.count} arrays per shard, but a {cfg.layers}-layer v1 model "
                         f"has {len(order)} params plus a scalar step: does --config match the checkpoint?")
    specs = param_specs(cfg)
    values: dict[str, np.ndarray] = {}
    for n, (row, layer) in enumerate(tqdm(order, desc="reading v1 shards", unit="param"), start=first):
        parts = shards.leaf(n)
        try:
            value = _join(parts, row.join).astype(np.float32)
        except ValueError as e:
            raise ValueError(f"shards of {_leaf_name(row, layer)} do not fit together: {e}") from None
        spec = spec_at(specs, row.ours)
        axes, shape = (spec.axes, spec.shape) if layer is None else (spec.axes[1:], spec.shape[1:])
        if row.ours == "wte" and row.join == "sum":  # the embedding's bias, added to every row
            expected = shape[-1:]
        else:
            value = pad_vocab(value, axes, cfg)
            expected = shape
        if value.shape != expected:
            raise ValueError(f"v1 param {_leaf_name(row, layer)} (array {n} of each shard) joins to shape "
                             f"{value.shape}, but {row.ours} needs {expected}: does --config (layers, d_model, "
                             f"n_heads, n_vocab, cores_per_replica) match the checkpoint?")
        if layer is None:
            values[row.ours] = values[row.ours] + value if row.ours in values else value
        else:
            values.setdefault(row.ours, np.empty(spec.shape, np.float32))[layer] = value
    yield from values.items()
