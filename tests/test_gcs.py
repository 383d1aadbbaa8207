"""gs:// storage against a local GCS emulator (fake-gcs-server on 127.0.0.1, the `gcs_bucket` fixture)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import mtj
from conftest import REPO, assets, hf_gptj, hf_logits
from mtj import checkpoint
from test_scale import launch
from test_serve import free_port
from test_train import config, metrics, run_cli
from mtj.config import Config
from mtj.sharding import make_mesh
from mtj.train import Trainer, train


def test_epath_writes_lists_and_reads(gcs_dir):
    folder = epath.Path(gcs_dir) / "notes"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("first")
    (folder / "b.bin").write_bytes(bytes(range(256)))
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.bin"]
    assert (folder / "a.txt").read_text() == "first"
    assert (folder / "b.bin").read_bytes() == bytes(range(256))
    assert not (epath.Path(gcs_dir) / "missing.txt").exists()


def small(mp: int) -> Config:
    return Config(layers=2, d_model=64, n_heads=8, pe_rotary_dims=4, n_vocab=1000, seq=16, per_replica_batch=2,
                  cores_per_replica=mp, dtype="float32", warmup_steps=1, lr=1e-2)


def test_sharded_train_state_round_trips_through_a_bucket_onto_another_mesh(gcs_dir):
    trainer = Trainer(small(mp=4), make_mesh(mp=4, dp=2))
    state = trainer.init(seed=0)
    batch = np.random.RandomState(0).randint(0, 1000, (1, trainer.global_batch, 17)).astype(np.int32)
    state, _ = trainer.step(state, batch)  # non-zero optimizer moments
    run = f"{gcs_dir}/run"
    step_dir = checkpoint.save(run, 1, state["params"], trainer.cfg, opt_state=state["opt_state"], meta={"step": 1})
    assert str(step_dir) == f"{run}/step_1"
    assert sorted(p.name for p in epath.Path(run).iterdir()) == ["step_1"]
    assert (epath.Path(run) / "step_1" / "params").is_dir()
    assert checkpoint.complete_steps(run) == [1] and checkpoint.read_meta(run) == {"step": 1}

    other = Trainer(small(mp=2), make_mesh(mp=2, dp=4))
    items = checkpoint.restore_items(
        run, params=ocp.args.StandardRestore(other.abstract_state["params"]),
        opt_state=ocp.args.StandardRestore(other.abstract_state["opt_state"]))
    restored = {"params": items["params"], "opt_state": items["opt_state"]}
    saved = {"params": state["params"], "opt_state": state["opt_state"]}
    flat_saved = jax.tree.leaves_with_path(saved)
    flat_restored = jax.tree.leaves_with_path(restored)
    assert [p for p, _ in flat_saved] == [p for p, _ in flat_restored]
    for (path, a), (_, b) in zip(flat_saved, flat_restored):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert restored["params"]["wte"].sharding.mesh.shape == {"dp": 4, "mp": 2}
    assert restored["params"]["wte"].sharding == other.state_shardings["params"]["wte"]
    assert sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(restored["opt_state"])) > 0


def test_old_steps_are_pruned_in_a_bucket(gcs_dir):
    # Orbax's deleter asks google-cloud-storage whether the bucket has a hierarchical namespace.
    mngr = checkpoint.manager(gcs_dir, keep_last=2)
    for step in range(1, 5):
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.full(4, step, np.float32)})))
        mngr.wait_until_finished()
    mngr.close()
    assert sorted(p.name for p in epath.Path(gcs_dir).iterdir()) == ["step_3", "step_4"]
    restored = checkpoint.restore_items(gcs_dir, params=ocp.args.StandardRestore())["params"]
    np.testing.assert_array_equal(restored["w"], np.full(4, 4, np.float32))


def test_a_step_pruned_from_a_bucket_is_unlisted_before_its_data_goes(gcs_dir, monkeypatch):
    """A kill during pruning must not leave a step that looks complete without all its objects: the
    emulator removes a directory's objects in listing order, commit file first, so the kill trials cannot
    see the order; here the moment the bulk removal starts is observed, whatever order it would take."""
    mngr = checkpoint.manager(gcs_dir)
    for step in (1, 2):
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.full(4, step, np.float32)})))
    mngr.wait_until_finished()
    mngr.close()
    gpath = type(epath.Path(gcs_dir))
    rmtree = gpath.rmtree
    listed_at_removal = []

    def observed_rmtree(self, *args, **kwargs):
        listed_at_removal.append(checkpoint.complete_steps(gcs_dir))
        return rmtree(self, *args, **kwargs)

    monkeypatch.setattr(gpath, "rmtree", observed_rmtree)
    checkpoint.delete_step(epath.Path(gcs_dir) / "step_1")
    assert listed_at_removal == [[2]]  # step 1 was no longer a step when its objects began to go
    assert checkpoint.complete_steps(gcs_dir) == [2]


# --- a whole run in a bucket ------------------------------------------------------------------

def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ))  # the fixture's emulator variables included


def no_local_gs_dirs(*roots: Path) -> None:
    for root in roots:
        assert not [p for p in root.rglob("gs:*")], f"a 'gs:' directory appeared under {root}"


def test_training_in_a_bucket_resumes_exactly_after_kill(gcs_dir, tmp_path):
    bucket, prefix = gcs_dir[len("gs://"):].split("/", 1)
    made = cli("create_tfrecords.py", str(assets() / "text" / "tinyshakespeare.txt"), "shakes",
               "--output-dir", f"{gcs_dir}/data", "--tokenizer", "gpt2", "--seq", "32")
    assert made.returncode == 0, made.stderr[-2000:]
    assert (epath.Path(gcs_dir) / "data" / "shakes.index").is_file()
    cfg = config(tmp_path, total_steps=10, ckpt_every=5, cores_per_replica=2, bucket=bucket,
                 train_set=f"{gcs_dir}/data/shakes.index", model_dir=f"{prefix}/run")
    cfg.save(tmp_path / "cfg.json")
    reference = run_cli(tmp_path / "cfg.json", f"model_dir={prefix}/ref")
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = metrics(epath.Path(gcs_dir) / "ref")

    killed = run_cli(tmp_path / "cfg.json", kill=("after-step", 7))
    assert killed.returncode == -9
    run = epath.Path(gcs_dir) / "run"
    assert sorted(metrics(run)) == list(range(1, 6))  # the bucket's log matches its checkpoint (step 5)
    resumed = run_cli(tmp_path / "cfg.json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 5" in resumed.stdout
    got = metrics(run)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step]["loss"] == expected[step]["loss"], step
    names = {p.name for p in run.iterdir()}
    assert {"step_5", "step_10", "metrics.jsonl", "config.json", "loss.png", "tensorboard"} <= names
    no_local_gs_dirs(REPO, tmp_path)


def test_sample_and_export_from_a_bucket(gcs_dir, tmp_path):
    bucket, prefix = gcs_dir[len("gs://"):].split("/", 1)
    cfg = config(tmp_path, total_steps=2, bucket=bucket, model_dir=f"{prefix}/run")
    train(cfg, progress=False)
    run = f"{gcs_dir}/run"
    sampled = cli("sample.py", "--ckpt", run, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.strip()
    exported = cli("to_hf.py", "--ckpt", run, "--out", f"{gcs_dir}/hf")
    assert exported.returncode == 0, exported.stderr[-2000:]
    local = tmp_path / "hf"
    local.mkdir()
    for f in epath.Path(f"{gcs_dir}/hf").iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    tokens = np.array([[15496, 995, 11, 314]])
    np.testing.assert_allclose(hf_logits(local, tokens), mtj.load(run, dtype="float32").logits(tokens),
                               atol=1e-4, rtol=0)
    again = cli("to_hf.py", "--ckpt", run, "--out", f"{gcs_dir}/hf")  # never written over
    assert again.returncode != 0 and "already exists" in again.stderr
    no_local_gs_dirs(REPO, tmp_path)


def test_two_processes_checkpoint_to_one_bucket_dir(gcs_dir, tmp_path):
    bucket, prefix = gcs_dir[len("gs://"):].split("/", 1)
    cfg = config(tmp_path, cores_per_replica=4, per_replica_batch=4, total_steps=3, ckpt_every=3,
                 bucket=bucket, model_dir=f"{prefix}/two")
    cfg.save(tmp_path / "cfg.json")
    procs = launch(tmp_path / "cfg.json", free_port())
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    one = cfg.replace(bucket="", model_dir=str(tmp_path / "one"))
    train(one, progress=False)
    two = epath.Path(gcs_dir) / "two"
    np.testing.assert_allclose([metrics(two)[s]["loss"] for s in (1, 2, 3)],
                               [metrics(tmp_path / "one")[s]["loss"] for s in (1, 2, 3)], atol=1e-5, rtol=0)
    tokens = np.arange(12)[None]
    np.testing.assert_allclose(mtj.load(two, mp=4).logits(tokens), mtj.load(tmp_path / "one", mp=4).logits(tokens),
                               atol=1e-5, rtol=0)


def test_storage_mistakes_are_one_line_errors_naming_the_url(gcs_bucket):
    def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and all(n in last for n in needles), last

    one_line_error(cli("sample.py", "--ckpt", "gs://no-such-bucket/run", "--prompt", "x"), "gs://no-such-bucket/run")
    one_line_error(cli("train.py", "--config", f"{gcs_bucket}/missing.json"), f"{gcs_bucket}/missing.json",
                   "does not exist")
    # No emulator (a closed local port): gcsfs retries for ~30 s, then the error names the URL.
    unreachable = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", f"{gcs_bucket}/c.json"],
                                 cwd=REPO, capture_output=True, text=True,
                                 env={**os.environ, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"})
    one_line_error(unreachable, f"{gcs_bucket}/c.json", "cannot reach")


def test_import_from_hf_and_slim_within_a_bucket(gcs_dir, tmp_path):
    local = hf_gptj(tmp_path / "hf")
    for f in local.iterdir():  # an HF directory kept in a bucket
        (epath.Path(gcs_dir) / "hf" / f.name).write_bytes(f.read_bytes())
    imported = cli("from_hf.py", "--hf", f"{gcs_dir}/hf", "--out", f"{gcs_dir}/ckpt")
    assert imported.returncode == 0, imported.stderr[-2000:]
    slimmed = cli("slim.py", "--ckpt", f"{gcs_dir}/ckpt", "--out", f"{gcs_dir}/slim", "--dtype", "bf16")
    assert slimmed.returncode == 0, slimmed.stderr[-2000:]
    tokens = np.array([[1, 2, 3, 4, 5]])
    expected = hf_logits(local, tokens)
    for ckpt, atol in (("hf", 1e-4), ("ckpt", 1e-4), ("slim", 0.02 * np.abs(expected).max())):  # bf16 weights
        got = mtj.load(f"{gcs_dir}/{ckpt}", dtype="float32").logits(tokens)  # read straight from the bucket
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0, err_msg=ckpt)
    no_local_gs_dirs(REPO, tmp_path)
