"""Training: loss falls, gradient accumulation, mesh independence, exact resume, crash safety, resharding."""

import json
import os
import struct
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import mtj
from conftest import REPO, SHARP, assets, hf_gptj
from mtj.config import from_dict
from mtj.corpus import create_tfrecords
from mtj.tokenizer import load_tokenizer
from mtj.sharding import make_mesh
from mtj.train import Trainer, _restore_state, train
from mtj.workflows import import_hf


def config(tmp_path: Path, **kw):
    base = dict(layers=2, d_model=64, n_heads=8, pe_rotary_dims=4, n_vocab=50257, seq=32, per_replica_batch=1,
                cores_per_replica=1, lr=3e-3, end_lr=3e-4, warmup_steps=10, anneal_steps=190, total_steps=5,
                dtype="float32", tokenizer="gpt2", train_set=str(assets() / "text" / "tinyshakespeare.txt"),
                model_dir=str(tmp_path / "run"), log_every=1, ckpt_every=0, seed=3)
    return from_dict({**base, **kw})


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_loss_falls_on_real_text(tmp_path):
    cfg = config(tmp_path, total_steps=60, anneal_steps=50, per_replica_batch=2)
    train(cfg, progress=False)
    rows = metrics(tmp_path / "run")
    first, last = rows[1]["loss"], np.mean([rows[s]["loss"] for s in range(51, 61)])
    assert last < 0.7 * first, (first, last)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(rows[60])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 60


def test_gradient_accumulation_equals_big_batch(tmp_path):
    mesh = make_mesh(mp=1, dp=1)
    batch = np.random.RandomState(0).randint(0, 50257, (8, 33)).astype(np.int32)
    grads, params = [], []
    for gas, prb in [(4, 2), (1, 8)]:
        trainer = Trainer(config(tmp_path, gradient_accumulation_steps=gas, per_replica_batch=prb, warmup_steps=0,
                                 lr=1e-4, grad_accum_dtype="float32"), mesh)
        state = trainer.init(seed=0)
        micro = batch.reshape(gas, prb, 33)
        g, _ = jax.jit(trainer.gradients)(state["params"], micro)
        grads.append(jax.tree.map(np.asarray, g))
        state, _ = trainer.step(state, micro)
        params.append(jax.tree.map(np.asarray, state["params"]))
    for a, b in [grads, params]:  # the accumulated gradient, and the parameters after the update
        assert max(jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), a, b))) < 1e-5
    assert max(np.abs(g).max() for g in jax.tree.leaves(grads[0])) > 1e-3  # not trivially zero


def test_same_losses_on_every_mesh(tmp_path):
    losses = {}
    for dp, mp in [(8, 1), (2, 4), (1, 8)]:
        run = tmp_path / f"dp{dp}_mp{mp}"
        train(config(tmp_path, cores_per_replica=mp, per_replica_batch=8 // dp, model_dir=str(run)), progress=False)
        losses[dp, mp] = [metrics(run)[s]["loss"] for s in range(1, 6)]
    for key, value in losses.items():
        np.testing.assert_allclose(value, losses[8, 1], atol=1e-4, rtol=0, err_msg=str(key))
    assert losses[8, 1][-1] < losses[8, 1][0]


def run_cli(cfg_path: Path, *overrides: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """scripts/train.py, or with `kill` ("after-step" or "during-save", N) tests/kill_train.py."""
    command = [str(REPO / "tests" / "kill_train.py"), kill[0], str(kill[1])] if kill else [str(REPO / "scripts" / "train.py")]
    return subprocess.run([sys.executable, *command, "--config", str(cfg_path), "--no-progress", *overrides], cwd=REPO,
                          capture_output=True, text=True)


def test_sigterm_and_sigint_stop_after_the_step_with_a_checkpoint_and_resume_exactly(tmp_path):
    """A preempted VM's SIGTERM (here twice: the second lands during the save) and a user's Ctrl-C, each at a
    random step: the run saves that step, exits 0 saying so, and the resumed run's losses are the
    uninterrupted run's."""
    cfg = config(tmp_path, total_steps=12, ckpt_every=0)
    train(config(tmp_path, total_steps=12, ckpt_every=0, model_dir=str(tmp_path / "ref")), progress=False)
    expected = metrics(tmp_path / "ref")
    path = tmp_path / "cfg.json"
    cfg.save(path)
    rng, stopped = np.random.default_rng(), 0
    for sig, twice in ((signal.SIGTERM, True), (signal.SIGINT, False)):
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(path),
                                 "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        at = stopped + int(rng.integers(2, 5))  # once this step is logged
        while proc.poll() is None and not ((tmp_path / "run" / "metrics.jsonl").exists() and
                                           max(metrics(tmp_path / "run"), default=0) >= at):
            time.sleep(0.05)
        proc.send_signal(sig)
        if twice:
            time.sleep(0.05)
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        stopped = mtj.checkpoint.complete_steps(tmp_path / "run")[0]
        assert stopped >= at and f"stopped by {sig.name} after step {stopped}: checkpoint {tmp_path / 'run'}/step_{stopped} " \
            "is saved; run the same command to go on from it" in out, (out, err[-2000:])
        got = metrics(tmp_path / "run")  # (the second run resumed from the first one's stop)
        assert sorted(got) == list(range(1, stopped + 1))
        assert [got[s]["loss"] for s in got] == [expected[s]["loss"] for s in got]


def test_resume_after_kill_is_exact(tmp_path):
    # TFRecord input written by create_tfrecords.py, as a user would train.
    index = create_tfrecords(str(assets() / "text" / "tinyshakespeare.txt"), "shakes", tmp_path / "data",
                             load_tokenizer("gpt2"), seq=32, progress=False)
    cfg = config(tmp_path, total_steps=10, ckpt_every=5, cores_per_replica=2, train_set=str(index))
    path = tmp_path / "cfg.json"
    cfg.save(path)
    train(cfg.replace(model_dir=str(tmp_path / "ref")), progress=False)
    expected = metrics(tmp_path / "ref")

    # Killed (SIGKILL) right after step 7: the rerun continues from step 5.
    killed = run_cli(path, kill=("after-step", 7))
    assert killed.returncode == -9
    assert sorted(metrics(tmp_path / "run")) == list(range(1, 8))
    resumed = run_cli(path)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 5" in resumed.stdout
    got = metrics(tmp_path / "run")
    assert sorted(got) == list(range(1, 11))
    for step in range(6, 11):
        assert got[step]["loss"] == expected[step]["loss"], step

    # Killed in the middle of writing step_10 (async save in flight): step 5 stays the latest complete one.
    run = tmp_path / "run"
    for d in run.glob("step_10"):
        import shutil
        shutil.rmtree(d)
    crashed = run_cli(path, kill=("during-save", 10))
    assert crashed.returncode == -9
    # the kill found step 10 half written: a directory with files in it, and no commit
    half = [p for p in run.iterdir() if p.name.startswith("step_10")]
    assert half and any(f.is_file() for f in half[0].rglob("*")), sorted(p.name for p in run.iterdir())
    assert mtj.checkpoint.complete_steps(run) == [5]
    assert mtj.checkpoint.read_meta(run)["step"] == 5
    lm = mtj.load(run, mp=1)
    assert np.isfinite(lm.logits([[1, 2, 3]])).all()
    again = run_cli(path)
    assert again.returncode == 0, again.stderr
    assert metrics(run)[10]["loss"] == expected[10]["loss"]


def test_checkpoint_restores_on_other_meshes(tmp_path):
    cfg = config(tmp_path, cores_per_replica=4, per_replica_batch=2, total_steps=3)
    state = train(cfg, progress=False)
    tokens = np.random.RandomState(1).randint(0, 50257, (2, 16))
    original = mtj.lm.LM(cfg, state["params"], make_mesh(mp=4), None).logits(tokens)
    for mp in (8, 1):
        lm = mtj.load(tmp_path / "run", mp=mp)
        assert lm.params["wte"].sharding.mesh.shape["mp"] == mp
        np.testing.assert_allclose(lm.logits(tokens), original, atol=1e-5, rtol=0)
    assert mtj.load(tmp_path / "run").tokenizer.encode("Hello world") == [15496, 995]


def test_fine_tune_from_imported_checkpoint(tmp_path):
    base = config(tmp_path, total_steps=3, model_dir=str(tmp_path / "base"))
    train(base, progress=False)
    tuned = config(tmp_path, total_steps=2, model_dir=str(tmp_path / "tuned"), warmup_steps=5)
    train(tuned, tune_model_path=str(tmp_path / "base"), fresh_opt=True, progress=False)
    rows = metrics(tmp_path / "tuned")
    assert sorted(rows) == [1, 2] and rows[1]["lr"] == 0.0  # a fresh schedule from step 0
    fresh = config(tmp_path, total_steps=1, model_dir=str(tmp_path / "fresh"))
    train(fresh, progress=False)
    assert rows[1]["loss"] < metrics(tmp_path / "fresh")[1]["loss"]  # it started from the trained weights

    # Fine-tuning keeps the base's optimizer state unless told not to: its first step is the base's state
    # (schedule from step 0) stepped on the first batch.
    kept = config(tmp_path, total_steps=1, model_dir=str(tmp_path / "kept"))
    trainer = Trainer(kept)
    saved, _ = _restore_state(trainer, tmp_path / "base", with_opt=True, resume=True)
    batch = next(trainer.loader(kept.train_set, load_tokenizer("gpt2")))
    expected, _ = trainer.step({**saved, "step": jax.numpy.zeros_like(saved["step"])}, batch)
    got = train(kept, tune_model_path=str(tmp_path / "base"), progress=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    wrong = config(tmp_path, d_model=32, model_dir=str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="d_model"):
        train(wrong, tune_model_path=str(tmp_path / "base"), progress=False)


def test_fine_tune_from_an_hf_import_starts_from_its_weights(tmp_path):
    import torch
    import transformers

    hf = hf_gptj(tmp_path / "hf", vocab_size=50257, n_embd=64, n_head=8, rotary_dim=4, n_layer=2, **SHARP)
    import_hf(hf, tmp_path / "imported", dtype="float32")  # weights only: the optimizer starts fresh
    cfg = config(tmp_path, total_steps=1, model_dir=str(tmp_path / "tuned"))
    batch = next(Trainer(cfg).loader(cfg.train_set, load_tokenizer("gpt2")))[0]
    train(cfg, tune_model_path=str(tmp_path / "imported"), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():  # the first step's loss is transformers' loss on that batch
        want = model(torch.tensor(batch, dtype=torch.long), labels=torch.tensor(batch, dtype=torch.long)).loss.item()
    assert abs(metrics(tmp_path / "tuned")[1]["loss"] - want) < 1e-5 * want


def test_validation_keep_every_and_the_cached_cpu_peak(tmp_path, monkeypatch):
    from mtj.metrics import _cache_path, _cpu_model, flops_per_token

    text = str(assets() / "text" / "tinyshakespeare.txt")
    cfg = config(tmp_path, total_steps=4, val_set={"shakes": text}, val_every=2, val_batches=2, ckpt_every=1,
                 keep_last=1, keep_every=2)
    # MFU divides by the CPU's matmul peak cached per CPU model: a cached value is used as it is
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _cache_path().parent.mkdir(parents=True)
    _cache_path().write_text(json.dumps({f"{_cpu_model()} {os.cpu_count()} cores float32": 1e9}))
    state = train(cfg, progress=False)
    rows = metrics(tmp_path / "run")

    assert [s for s in rows if "val/shakes" in rows[s]] == [2, 4]  # every val_every steps
    trainer = Trainer(cfg)
    want = trainer.evaluate(state["params"], trainer.loader(text, load_tokenizer("gpt2"), shuffle=False), 2)
    assert abs(rows[4]["val/shakes"] - want) < 1e-6 * want  # the first val_batches batches, in order
    assert sorted(mtj.checkpoint.complete_steps(tmp_path / "run")) == [2, 4]  # keep_last 1, and every 2nd step kept
    for row in rows.values():
        assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * flops_per_token(cfg) / 1e9, rel=1e-9)
    assert rows[4]["tokens_per_sec"] > 0


def test_skip_corrupt_records_reaches_the_loader(tmp_path):
    from test_data import framed

    index = create_tfrecords(str(assets() / "text" / "tinyshakespeare.txt"), "shakes", tmp_path / "data",
                             load_tokenizer("gpt2"), seq=32, progress=False)
    (records,) = (tmp_path / "data").glob("*.tfrecords")
    good = records.read_bytes()
    second = 16 + int.from_bytes(good[:8], "little")  # the second record's offset: after the first's frame
    records.write_bytes(good[:second] + framed(b"\x0a\x07garbage") + good[second:])  # not an Example
    with pytest.warns(UserWarning, match=rf"skipping corrupt record.*{records.name}.*byte offset {second} "):
        train(config(tmp_path, total_steps=2, train_set=str(index), skip_corrupt_records=True), progress=False)
    assert sorted(metrics(tmp_path / "run")) == [1, 2]


def wandb_records(path: Path):
    """The records of a W&B offline run's transaction log (run-*.wandb): a 7-byte header, then LevelDB-log
    framing (crc32 4, length 2, type 1; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        parts, pos = parts + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_gets_the_run_and_every_row(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # written to WANDB_DIR; nothing is sent
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, total_steps=3, wandb_project="mtj-test", name="tiny run")
    train(cfg, progress=False)
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    runs, history = [], {}
    for record in wandb_records(log):
        if record.HasField("run"):
            runs.append((record.run.project, record.run.display_name))
        elif record.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    assert runs[0] == ("mtj-test", "tiny run")
    rows = metrics(tmp_path / "run")
    assert sorted(history) == sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        assert {k: history[step][k] for k in row if k != "step"} == {k: v for k, v in row.items() if k != "step"}


def test_the_command_says_what_the_run_is_and_what_it_did(tmp_path):
    text = str(assets() / "text" / "tinyshakespeare.txt")
    cfg = config(tmp_path, total_steps=2, val_set={"shakes": text}, val_every=2, val_batches=1)
    cfg.save(tmp_path / "cfg.json")
    first = run_cli(tmp_path / "cfg.json")
    assert first.returncode == 0, first.stderr[-2000:]
    lines = first.stdout.splitlines()
    assert lines[0].startswith("model: gptj, ") and "M parameters (2 layers, d_model 64" in lines[0]
    assert lines[1].startswith("devices: 8 x cpu over 1 process(es), mesh {'dp': 8, 'mp': 1}"), lines[1]
    assert lines[2] == "batch: 1 x 8 sequences of 32 tokens = 256 tokens per step"
    assert lines[3].startswith(f"data: {text} (") and "steps per epoch); run: " in lines[3]
    val = metrics(tmp_path / "run")[2]["val/shakes"]
    assert f"step 2: val/shakes {val:.4f}" in lines  # validation is shown, not only logged
    assert lines[-1].startswith("trained steps 1-2 in ") and f"val/shakes {val:.4f}" in lines[-1]
    assert lines[-1].endswith(f"checkpoints: {tmp_path / 'run'}")
    again = run_cli(tmp_path / "cfg.json")  # a finished run says so
    assert again.returncode == 0 and "is already at step 2 of total_steps=2: nothing to train" in again.stdout
    fresh = run_cli(tmp_path / "cfg.json", "--fresh-opt")
    assert fresh.returncode == 2 and "--fresh-opt applies to --tune-model-path" in fresh.stderr
    hf = hf_gptj(tmp_path / "hf", vocab_size=50257, n_embd=64, n_head=8, rotary_dim=4, n_layer=2)
    tune = run_cli(tmp_path / "cfg.json", "--tune-model-path", str(hf), f"model_dir={tmp_path / 'tuned'}")
    last = tune.stderr.strip().splitlines()[-1]
    assert tune.returncode == 1 and last.startswith("error: --tune-model-path") and "mtj-from-hf" in last, last
