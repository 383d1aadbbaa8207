"""Checkpoints: Orbax step directories `model_dir/step_{N}/` that describe themselves.

A step directory holds the items `params`, optionally `opt_state`, and JSON
items `meta` (step, data position, RNG), `config` and `tokenizer`. Orbax
writes each step into a temporary directory and renames it when complete, so
a crash mid-save never leaves a step that looks finished.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from mtj.config import Config, from_dict
from mtj.model import Params, param_axes, param_specs
from mtj.paths import PathLike, refuse_overwrite, user_path
from mtj.sharding import tree_shardings
from mtj.tokenizer import Tokenizer

STEP_RE = re.compile(r"^step_(\d+)$")


def manager(model_dir: PathLike, keep_last: int | None = None, keep_every: int | None = None,
            async_save: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        step_prefix="step",
        max_to_keep=keep_last or None,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(user_path(model_dir), options=options)


def save_args(params: Params, cfg: Config, tokenizer: Tokenizer | None, opt_state: Any = None,
              meta: dict | None = None) -> ocp.args.Composite:
    items: dict[str, Any] = {
        "params": ocp.args.StandardSave(params),
        "config": ocp.args.JsonSave(cfg.to_dict()),
        "meta": ocp.args.JsonSave(meta or {}),
    }
    if tokenizer is not None:
        items["tokenizer"] = ocp.args.JsonSave({"tokenizer_json": tokenizer.to_json()})
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    return ocp.args.Composite(**items)


def save(model_dir: PathLike, step: int, params: Params, cfg: Config, tokenizer: Tokenizer | None = None,
         **extra: Any) -> epath.Path:
    """Write one complete step synchronously (used by conversion and slimming)."""
    mngr = manager(model_dir)
    mngr.save(step, args=save_args(params, cfg, tokenizer, **extra), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return user_path(model_dir) / f"step_{step}"


def is_checkpoint(path: PathLike) -> bool:
    path = user_path(path)
    return (path / "params").is_dir() or any(STEP_RE.match(p.name) for p in path.glob("step_*"))


def resolve(ckpt: PathLike) -> tuple[epath.Path, int]:
    """(model_dir, step) for a model_dir (its latest complete step) or a step directory."""
    path = user_path(ckpt)
    m = STEP_RE.match(path.name)
    if m and (path / "params").is_dir():
        return path.parent, int(m.group(1))
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    steps = manager(path).all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete step_N checkpoint in {path}")
    return path, max(steps)


def restore_items(ckpt: PathLike, **items: Any) -> Any:
    model_dir, step = resolve(ckpt)
    mngr = manager(model_dir)
    try:
        return mngr.restore(step, args=ocp.args.Composite(**items))
    finally:
        mngr.close()


def read_config(ckpt: PathLike) -> Config:
    return from_dict(restore_items(ckpt, config=ocp.args.JsonRestore())["config"])


def read_meta(ckpt: PathLike) -> dict:
    return restore_items(ckpt, meta=ocp.args.JsonRestore())["meta"]


def read_tokenizer(ckpt: PathLike) -> Tokenizer | None:
    model_dir, step = resolve(ckpt)
    if not (model_dir / f"step_{step}" / "tokenizer").is_dir():
        return None
    return Tokenizer.from_json(restore_items(ckpt, tokenizer=ocp.args.JsonRestore())["tokenizer"]["tokenizer_json"])


def abstract_params(cfg: Config, mesh: Mesh) -> Params:
    """ShapeDtypeStructs with target shardings: restoring onto them reshards to `mesh`."""
    shardings = tree_shardings(param_axes(cfg), mesh, cfg.fsdp)
    specs = param_specs(cfg)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, jax.numpy.dtype(cfg.param_dtype), sharding=sh),
        specs, shardings, is_leaf=lambda x: hasattr(x, "axes"))


def restore_params(ckpt: PathLike, cfg: Config, mesh: Mesh) -> Params:
    return restore_items(ckpt, params=ocp.args.StandardRestore(abstract_params(cfg, mesh)))["params"]


def slim(ckpt: PathLike, out: PathLike, dtype: str = "bf16") -> epath.Path:
    """A params-only copy of a checkpoint in a smaller dtype (no optimizer state): for sampling and serving."""
    from mtj.sharding import make_mesh

    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype not in names:
        raise ValueError(f"--dtype must be one of {sorted(names)}, got '{dtype}'")
    refuse_overwrite(out)
    cfg = read_config(ckpt).replace(cores_per_replica=1)
    params = restore_params(ckpt, cfg, make_mesh(mp=1, dp=1))
    small = jax.tree.map(lambda a: a.astype(names[dtype]), params)
    _, step = resolve(ckpt)
    return save(out, step, small, cfg.replace(param_dtype=names[dtype]), read_tokenizer(ckpt))
