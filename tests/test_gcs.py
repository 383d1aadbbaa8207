"""gs:// storage against a local GCS emulator (fake-gcs-server on 127.0.0.1, the `gcs_bucket` fixture)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mtj import checkpoint
from mtj.config import Config
from mtj.sharding import make_mesh
from mtj.train import Trainer


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
    assert checkpoint.resolve(run)[1] == 1 and checkpoint.read_meta(run) == {"step": 1}

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
