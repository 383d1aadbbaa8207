"""Storage faults injected into real checkpoints, on a local disk and in the emulator bucket: each is
answered by resuming from the step before, or by an error naming the step; nothing earlier changes."""

import hashlib
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

import mtj
from mtj import checkpoint
from mtj.paths import files_under
from mtj.train import Trainer, _restore_state, train
from test_train import config, metrics


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """A run with complete steps 2, 4 and 6 (params, optimizer state, meta, config, tokenizer)."""
    root = tmp_path_factory.mktemp("template")
    train(config(root, total_steps=6, ckpt_every=2, keep_last=3), progress=False)
    return root / "run"


def copy_run(template: Path, where: str, tmp_path: Path, gcs_dir: str | None) -> epath.Path:
    if where == "local":
        shutil.copytree(template, tmp_path / "run")
        return epath.Path(tmp_path / "run")
    run = epath.Path(f"{gcs_dir}/run")
    for f in files_under(template):
        (run / f.relative_to(template)).write_bytes(f.read_bytes())
    return run


@pytest.fixture(params=["local", "bucket"])
def run(request, template, tmp_path) -> epath.Path:
    gcs_dir = request.getfixturevalue("gcs_dir") if request.param == "bucket" else None
    return copy_run(template, request.param, tmp_path, gcs_dir)


def digests(root: epath.Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files_under(root)}


def zero_chunks(step: epath.Path) -> None:
    for f in files_under(step / "params" / "ocdbt.process_0" / "d"):
        f.write_bytes(bytes(len(f.read_bytes())))


FAULTS = {
    "params directory missing": (lambda step: (step / "params").rmtree(), 'Item "params" was not found'),
    "zero-byte manifest": (lambda step: (step / "params" / "manifest.ocdbt").write_bytes(b""), "DATA_LOSS"),
    "zero-byte metadata file": (lambda step: (step / "params" / "_METADATA").write_bytes(b""), "JSONDecodeError"),
    "zeroed data chunks": (zero_chunks, "ZSTD_decompressStream() failed"),
}


def params_of(ckpt) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(mtj.load(ckpt).params)]


def caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(x.message) for x in w]


@pytest.mark.parametrize("fault", FAULTS)
def test_resume_skips_a_damaged_latest_step(run, fault, template):
    inject, reason = FAULTS[fault]
    inject(run / "step_6")
    before = digests(run)
    trainer = Trainer(config(Path("/unused"), total_steps=6, ckpt_every=2))
    (state, meta), messages = caught(lambda: _restore_state(trainer, run, with_opt=True, resume=True))

    assert int(state["step"]) == 4 and meta["step"] == 4
    for got, want in zip(jax.tree.leaves(state["params"]), params_of(template / "step_4")):
        np.testing.assert_array_equal(np.asarray(got), want)
    warned = [m for m in messages if "does not restore" in m]
    assert len(warned) == 1 and f"{run}/step_6 " in warned[0] and reason in warned[0], messages
    # The damaged step is set aside whole (the run will write step 6 again); the others are untouched.
    aside = [p.name for p in run.iterdir() if p.name.startswith("step_6.unrestorable-")]
    assert len(aside) == 1, list(run.iterdir())
    after = digests(run)
    moved = {k.replace(aside[0], "step_6", 1): v for k, v in after.items()}
    assert moved == before
    assert checkpoint.complete_steps(run) == [4, 2]


@pytest.mark.parametrize("fault", ["params directory missing", "zeroed data chunks"])
def test_load_of_a_model_dir_uses_the_newest_step_that_restores(run, fault, template):
    FAULTS[fault][0](run / "step_6")
    before = digests(run)
    lm, messages = caught(lambda: mtj.load(run))
    for got, want in zip(jax.tree.leaves(lm.params), params_of(template / "step_4")):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert any(f"{run}/step_6 does not restore" in m for m in messages), messages
    assert lm.tokenizer is not None
    assert digests(run) == before  # a reader moves nothing

    # Naming the damaged step itself is an error that names it; so is a model_dir with no good step.
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {run}/step_6 does not restore: "):
        mtj.load(run / "step_6")
    for step in ("step_2", "step_4"):
        FAULTS[fault][0](run / step)
    with pytest.raises(checkpoint.CheckpointError, match=r"no step of .* restores.*step_6.*step_4.*step_2"):
        caught(lambda: mtj.load(run))


def test_training_resumes_past_a_damaged_step_exactly(template, tmp_path):
    reference = metrics(template)  # the uninterrupted run: steps 1..6
    run = copy_run(template, "local", tmp_path, None)
    shutil.rmtree(tmp_path / "run" / "step_6" / "params")
    kept = {s: reference[s] for s in range(1, 5)}
    _, messages = caught(lambda: train(config(tmp_path, total_steps=6, ckpt_every=2, keep_last=3), progress=False))
    assert any("step_6 does not restore" in m for m in messages)
    got = metrics(Path(run))
    assert {s: got[s] for s in range(1, 5)} == kept  # earlier rows unchanged
    for step in (5, 6):  # steps 5 and 6 trained again from step 4 reproduce the reference
        assert got[step]["loss"] == reference[step]["loss"], step
    for got_p, want in zip(params_of(run / "step_6"), params_of(template / "step_6")):
        np.testing.assert_array_equal(got_p, want)
