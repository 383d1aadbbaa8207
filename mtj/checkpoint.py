"""Checkpoints: Orbax step directories `model_dir/step_{N}/` that describe themselves.

A step directory holds the items `params`, optionally `opt_state`, and JSON
items `meta` (step, data position, RNG), `config` and `tokenizer`. Orbax
writes each step aside (locally a temporary directory renamed when complete;
in a bucket the step's objects, then its `commit_success.txt`), so a crash
mid-save never leaves a step that looks finished. Pruning is made as safe (see
`delete_step`), and a reader takes the newest step that actually restores: a
step damaged after it was written (a lost directory, a truncated or zeroed
file) is skipped with a warning that names it and says why.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mtj import lora, quantize
from mtj.config import Config, ConfigError, from_dict
from mtj.model import Params, param_shardings, param_specs
from mtj.paths import PathLike, is_remote, user_path
from mtj.tokenizer import Tokenizer

STEP_RE = re.compile(r"^step_(\d+)$")
COMMIT_FILE = "commit_success.txt"  # what Orbax checks in a bucket to call a step complete
TRASH = ".deleting"  # local steps being deleted are renamed in here first
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored; the message names the step directory and why."""


class StepUnreadable(CheckpointError):
    """A step that could not be read for a reason that is not its files' (permissions, memory, storage down)."""


def delete_step(step_dir: epath.Path) -> None:
    """Delete a step so that a kill at any moment leaves either the whole step or one no reader takes.

    Orbax removes a step's files in no particular order: killed midway, an older step could keep
    looking complete while arrays or the optimizer state are gone. So the step first stops being
    a step in one atomic operation: locally a rename into `model_dir/.deleting/`, in a bucket the
    removal of its commit file (Orbax lists no step without one). Then the rest goes.
    """
    if is_remote(step_dir):
        (step_dir / COMMIT_FILE).unlink(missing_ok=True)
        step_dir.rmtree(missing_ok=True)
        return
    trash = step_dir.parent / TRASH / step_dir.name
    trash.parent.mkdir(exist_ok=True)
    if trash.exists():
        trash.rmtree()
    step_dir.rename(trash)
    trash.rmtree()
    with contextlib.suppress(OSError):  # another deletion may be under way
        trash.parent.rmdir()


class _StepDeleter:
    """Orbax's `CheckpointDeleter` protocol over `delete_step` (the primary process deletes)."""

    def __init__(self, directory: epath.Path):
        self.directory = directory

    def delete(self, step: int) -> None:
        if jax.process_index() == 0:
            delete_step(self.directory / f"step_{step}")

    def delete_steps(self, steps: list[int]) -> None:
        for step in steps:
            self.delete(step)

    def close(self) -> None:
        pass


def manager(model_dir: PathLike, keep_last: int | None = None, keep_every: int | None = None,
            async_save: bool = False) -> ocp.CheckpointManager:
    """The manager that writes a run's steps: it prunes with `delete_step` and, on opening, clears
    what a killed process left (half-written steps, half-deleted ones)."""
    directory = user_path(model_dir)
    options = ocp.CheckpointManagerOptions(
        step_prefix="step",
        max_to_keep=keep_last or None,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
    )
    if jax.process_index() == 0 and (directory / TRASH).exists():
        (directory / TRASH).rmtree()
    mngr = ocp.CheckpointManager(directory, options=options)
    # Orbax has no public hook for the deleter; this attribute is what its pruning calls.
    if not hasattr(mngr, "_checkpoint_deleter"):
        raise RuntimeError(f"orbax-checkpoint {ocp.__version__} has no _checkpoint_deleter: mtj's safe pruning needs updating")
    mngr._checkpoint_deleter = _StepDeleter(directory)
    return mngr


def save_args(params: Params, cfg: Config, tokenizer: Tokenizer | None, opt_state: Any = None,
              meta: dict | None = None) -> ocp.args.Composite:
    items: dict[str, Any] = {
        "params": ocp.args.StandardSave(params),
        "config": ocp.args.JsonSave(cfg.to_dict()),
        "meta": ocp.args.JsonSave(meta or {}),
    }
    if tokenizer is not None:
        items["tokenizer"] = ocp.args.JsonSave(tokenizer.to_item())
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


def _reader(model_dir: epath.Path) -> contextlib.closing[ocp.CheckpointManager]:
    # Not Orbax's read_only mode: it logs warnings on every open; this one writes nothing either.
    options = ocp.CheckpointManagerOptions(step_prefix="step", create=False)
    return contextlib.closing(ocp.CheckpointManager(model_dir, options=options))


def _is_step_dir(path: epath.Path) -> bool:
    return bool(STEP_RE.match(path.name)) and not any(STEP_RE.match(p.name) for p in path.glob("step_*"))


def is_checkpoint(path: PathLike) -> bool:
    """A step directory (by its name: a damaged one too) or a directory of them."""
    path = user_path(path)
    return path.is_dir() and (bool(STEP_RE.match(path.name)) or any(STEP_RE.match(p.name) for p in path.glob("step_*")))


def step_number(step_dir: epath.Path) -> int:
    return int(STEP_RE.match(step_dir.name).group(1))


def complete_steps(model_dir: PathLike) -> list[int]:
    """The steps Orbax lists as complete in a model_dir, newest first ([] for none or no directory)."""
    path = user_path(model_dir)
    if not path.is_dir():
        return []
    with _reader(path) as mngr:
        return sorted(mngr.all_steps(), reverse=True)


def step_dirs(ckpt: PathLike) -> list[epath.Path]:
    """The step directories a checkpoint path names, newest first: a step directory itself, or the
    complete steps of a model_dir."""
    path = user_path(ckpt)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_step_dir(path):
        return [path]
    steps = complete_steps(path)
    if not steps:
        raise FileNotFoundError(f"no complete step_N checkpoint in {path}")
    return [path / f"step_{s}" for s in steps]


def latest(ckpt: PathLike) -> epath.Path:
    """The newest complete step directory (as listed; `restore_newest` also checks that it restores)."""
    return step_dirs(ckpt)[0]


def _reason(error: BaseException) -> str:
    """The root cause in one line: Orbax wraps TensorStore's precise message in a long generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _set_aside(bad_dirs: list[epath.Path], good: epath.Path) -> None:
    """Rename unrestorable steps out of the way (process 0; the others wait) after every process
    found the same step `good` to restore."""
    if jax.process_count() > 1:
        chosen = multihost_utils.process_allgather(np.array(step_number(good)))
        if len(set(chosen.tolist())) > 1:
            raise CheckpointError(f"the processes restored different steps of {good.parent}: {chosen.tolist()}")
    if jax.process_index() == 0:
        for bad in bad_dirs:
            aside = bad.parent / f"{bad.name}.unrestorable-{time.strftime('%Y%m%d-%H%M%S')}"
            bad.rename(aside)
            warnings.warn(f"moved the unrestorable {bad} to {aside}; training continues from {good}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mtj: unrestorable steps set aside")


# Failures that say nothing about the step's files: raised (after retries for the passing ones), never a
# reason to set a good step aside and resume from an older one. Matched on the exception chain's types and
# on the status names TensorStore and the storage clients put in their messages.
PASSING = (ConnectionError, TimeoutError)
PASSING_HTTP, NOT_DAMAGE_HTTP = {408, 429, 500, 502, 503, 504}, {401, 403}  # a storage client's error `code`
PASSING_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "503 Service Unavailable", "429 Too Many Requests")
NOT_DAMAGE = (PermissionError, MemoryError)
NOT_DAMAGE_STATUS = ("PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "Forbidden", "Unauthorized")
RETRIES = (1.0, 4.0)  # seconds before each retry of a passing failure


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def kind_of_failure(error: BaseException) -> str:
    """'passing' (retry), 'fatal' (raise: permissions, memory) or 'damage' (the step's files are wrong)."""
    chain = _chain(error)
    text = " ".join(str(e) for e in chain)
    codes = {getattr(e, "code", None) for e in chain}
    if any(isinstance(e, PASSING) for e in chain) or codes & PASSING_HTTP or any(s in text for s in PASSING_STATUS):
        return "passing"
    if any(isinstance(e, NOT_DAMAGE) for e in chain) or codes & NOT_DAMAGE_HTTP or any(s in text for s in NOT_DAMAGE_STATUS):
        return "fatal"
    return "damage"


def _access_error(step_dir: epath.Path) -> OSError | None:
    """The error reading the step's tree raises, if any: Orbax reports a directory it may not read as
    missing, which would look like damage. Lists every directory (and locally reads a byte of each file)."""
    folders = [step_dir]
    try:
        while folders:
            for path in folders.pop().iterdir():
                if path.is_dir():
                    folders.append(path)
                elif not is_remote(path):
                    with path.open("rb") as f:
                        f.read(1)
    except (PermissionError, ConnectionError, TimeoutError) as e:
        return e
    except OSError:  # a missing or broken file: damage indeed
        return None
    return None


def _restore_step(restore: Callable[[epath.Path], T], step_dir: epath.Path) -> T:
    """restore(step_dir), retried after passing failures; a failure that is not damage is raised naming the step."""
    for wait in (*RETRIES, None):
        try:
            return restore(step_dir)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 -- sorted below: only damage is returned to the caller's loop
            kind = kind_of_failure(e)
            if kind == "damage":
                denied = _access_error(step_dir)
                if denied is None:
                    raise
                e, kind = denied, kind_of_failure(denied)
            if kind == "passing" and wait is not None:
                warnings.warn(f"reading {step_dir} failed ({_reason(e)}); retrying in {wait:g} s")
                time.sleep(wait)
                continue
            raise StepUnreadable(f"cannot read {step_dir}: {_reason(e)}. The step itself was not found damaged, so it "
                                  "is kept and the run stops here: fix the cause and start again") from e
    raise AssertionError("unreachable")


def restore_newest(ckpt: PathLike, restore: Callable[[epath.Path], T], set_aside: bool = False) -> tuple[T, epath.Path]:
    """`restore(step_dir)` for the newest step of `ckpt` that restores, and that step's directory.

    A damaged step (missing or undecodable files, data loss) is skipped with a warning naming it and
    the reason. With `set_aside` (a run that resumes and will write those step numbers again) the
    newer damaged steps are renamed to `step_N.unrestorable-<time>`, kept for inspection. A passing
    storage failure is retried, then raised like a permission or memory error: they say nothing about
    the step, which is kept. A ConfigError (the request does not fit the checkpoint, whatever the
    step) is raised at once; a step directory named explicitly is not replaced by another.
    """
    candidates = step_dirs(ckpt)
    failed: list[tuple[epath.Path, Exception]] = []
    for step_dir in candidates:
        try:
            result = _restore_step(restore, step_dir)
        except (ConfigError, StepUnreadable):
            raise
        except Exception as e:  # noqa: BLE001 -- damage: a reason to try the step before
            failed.append((step_dir, e))
            if len(candidates) > 1:
                warnings.warn(f"checkpoint {step_dir} does not restore ({_reason(e)}); trying the step before it")
            continue
        if set_aside and failed:
            _set_aside([bad for bad, _ in failed], step_dir)
        return result, step_dir
    if len(candidates) == 1:
        raise CheckpointError(f"checkpoint {candidates[0]} does not restore: {_reason(failed[0][1])}") from failed[0][1]
    reasons = "; ".join(f"{d.name}: {_reason(e)}" for d, e in failed)
    raise CheckpointError(f"no step of {ckpt} restores ({reasons})") from failed[0][1]


def restore_items(step_dir: PathLike, **items: Any) -> Any:
    """Restore Orbax items of one step directory (a model_dir: its newest complete step)."""
    step_dir = latest(step_dir)
    with _reader(step_dir.parent) as mngr:
        return mngr.restore(step_number(step_dir), args=ocp.args.Composite(**items))


def read_config(step_dir: PathLike) -> Config:
    return from_dict(restore_items(step_dir, config=ocp.args.JsonRestore())["config"])


def read_meta(step_dir: PathLike) -> dict:
    return restore_items(step_dir, meta=ocp.args.JsonRestore())["meta"]


def read_tokenizer(step_dir: PathLike) -> Tokenizer | None:
    step_dir = latest(step_dir)
    if not (step_dir / "tokenizer").is_dir():
        return None
    return Tokenizer.from_item(restore_items(step_dir, tokenizer=ocp.args.JsonRestore())["tokenizer"])


def stored_quantization(step_dir: PathLike) -> str:
    """How a step's weights are stored: "none", or "int8"/"int4" for `mtj-slim --quantize` (meta "quantized")."""
    return read_meta(step_dir).get("quantized", "none")


def abstract_params(cfg: Config, mesh: Mesh, quantized: str = "none") -> Params:
    """ShapeDtypeStructs with target shardings: restoring onto them reshards to `mesh`. `quantized`: the
    weights as a quantized checkpoint stores them (`mtj.quantize.QArray`s)."""
    shardings = param_shardings(cfg, mesh)
    specs = param_specs(cfg)

    def leaf(path: tuple, s: Any, sh: Any) -> jax.ShapeDtypeStruct:
        dtype = "float32" if lora.is_adapter(path[-1].key) else cfg.param_dtype  # (adapters are always fp32)
        return jax.ShapeDtypeStruct(s.shape, jax.numpy.dtype(dtype), sharding=sh)

    abstract = jax.tree_util.tree_map_with_path(leaf, specs, shardings, is_leaf=lambda x: hasattr(x, "axes"))
    return abstract if quantized == "none" else quantize.abstract_weights(abstract, quantized)


def restore_params(step_dir: PathLike, cfg: Config, mesh: Mesh, quantized: str = "none") -> Params:
    abstract = abstract_params(cfg, mesh, quantized)
    return restore_items(step_dir, params=ocp.args.StandardRestore(abstract))["params"]


def refuse_quantized(step_dir: PathLike, use: str) -> None:
    """A quantized checkpoint (`mtj-slim --quantize`) serves inference only: `use` (training, export) needs
    the checkpoint it was made from."""
    kind = stored_quantization(step_dir)
    if kind != "none":
        raise ConfigError(f"{step_dir} holds {kind}-quantized weights (mtj-slim --quantize), which are for "
                              f"sampling, serving and evaluation; {use} needs the checkpoint it was made from")


def check_same_model(cfg: Config, other: Config, source: str) -> None:
    """`other` (a checkpoint's config) describes the model `cfg` does, or a ConfigError lists the differences."""
    keys = ("model_type", "layers", "d_model", "n_heads", "d_head", "d_ff", "n_vocab", "pe_rotary_dims", "tie_embeddings")
    keys += ("seq",) if cfg.family.rotary is None else ()  # (learned positions: a table of seq rows)
    diff = [f"{k}: {getattr(other, k)} in {source} vs {getattr(cfg, k)}" for k in keys if getattr(cfg, k) != getattr(other, k)]
    if diff:
        raise ConfigError(f"the checkpoint {source} has a different model shape: " + "; ".join(diff))


# --- LoRA: a checkpoint of adapters names its base ---------------------------------------

def lora_base_of(step_dir: PathLike) -> dict | None:
    """{"path", "fingerprint"} of the base model a step of LoRA adapters was trained on (meta "lora_base");
    None for a step that holds a whole model."""
    return read_meta(step_dir).get("lora_base")


def restore_lora_base(ckpt: PathLike, cfg: Config, mesh: Mesh, dtype: str) -> tuple[Params, dict]:
    """The frozen base of `cfg`'s adapters from the checkpoint `ckpt` (its newest step that restores), in
    `dtype`, and its record for the adapters' meta: the step's path and the weights' fingerprint."""
    def restore(step_dir: epath.Path) -> Params:
        refuse_quantized(step_dir, "LoRA training")
        if (record := lora_base_of(step_dir)) is not None:
            raise ConfigError(f"{step_dir} holds LoRA adapters, not a base model: give their base ({record['path']}), "
                              "or a checkpoint with the adapters merged (mtj-to-hf --merge-lora, then mtj-from-hf)")
        check_same_model(cfg, read_config(step_dir), str(step_dir))
        return restore_params(step_dir, lora.base_config(cfg).replace(param_dtype=dtype), mesh)

    params, step_dir = restore_newest(ckpt, restore)
    return params, {"path": str(step_dir), "fingerprint": lora.fingerprint(params)}


def restore_recorded_base(record: dict, cfg: Config, mesh: Mesh, dtype: str, adapters: str) -> Params:
    """The base that adapters (at `adapters`) record, refused unless its weights are the ones they were trained on."""
    params, found = restore_lora_base(record["path"], cfg, mesh, dtype)
    if found["fingerprint"] != record["fingerprint"]:
        raise CheckpointError(f"{record['path']} is not the base model the adapters in {adapters} were trained on: its "
                              f"weights' fingerprint is {found['fingerprint']}, the adapters record "
                              f"{record['fingerprint']}. Put that base back at its path")
    return params


@dataclass
class Model:
    """One step's weights with the config and tokenizer stored beside them."""

    cfg: Config
    params: Params
    tokenizer: Tokenizer | None
    step_dir: epath.Path


def restore_model(ckpt: PathLike, mesh: Mesh, adjust: Callable[[Config], Config] = lambda cfg: cfg,
                  **overrides: Any) -> Model:
    """The newest step of `ckpt` that restores, onto `mesh`; `overrides` replace config keys, then `adjust`
    may change the config (the weights are restored in its param_dtype)."""
    def restore(step_dir: epath.Path) -> Model:
        quantized = stored_quantization(step_dir)
        if quantized != "none" and overrides.get("quantize", quantized) != quantized:
            raise ConfigError(f"{step_dir} holds {quantized}-quantized weights (mtj-slim --quantize); they "
                                  f"load as {quantized} only, not as quantize='{overrides['quantize']}': load the "
                                  "checkpoint it was made from for that")
        cfg = adjust(read_config(step_dir).replace(cores_per_replica=mesh.shape["mp"], **overrides))
        if (record := lora_base_of(step_dir)) is not None:  # adapters: merged into their base
            return Model(lora.base_config(cfg), _merged_adapters(step_dir, record, cfg, mesh), read_tokenizer(step_dir),
                         step_dir)
        return Model(cfg, restore_params(step_dir, cfg, mesh, quantized), read_tokenizer(step_dir), step_dir)

    return restore_newest(ckpt, restore)[0]


def restore_adapters(step_dir: PathLike, cfg: Config, mesh: Mesh) -> Params:
    """The LoRA adapters a step holds (fp32), onto `mesh`."""
    abstract = lora.split(abstract_params(cfg, mesh))[1]
    return restore_items(step_dir, params=ocp.args.StandardRestore(abstract))["params"]


def _merged_adapters(step_dir: epath.Path, record: dict, cfg: Config, mesh: Mesh) -> Params:
    """The adapters of `step_dir` folded into the base they record (in cfg's param_dtype)."""
    adapters = restore_adapters(step_dir, cfg, mesh)
    base = restore_recorded_base(record, cfg, mesh, cfg.param_dtype, str(step_dir))
    merge = jax.jit(lambda base, adapters: lora.merged(lora.combine(base, adapters), cfg), donate_argnums=0,
                    out_shardings=param_shardings(lora.base_config(cfg), mesh))
    with jax.set_mesh(mesh):
        return merge(base, adapters)
