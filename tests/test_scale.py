"""Scale-out: two real processes on 127.0.0.1 train as one mesh; FSDP splits every large leaf."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import mtj
from conftest import REPO
from test_serve import free_port
from test_train import config, metrics
from mtj.sharding import make_mesh
from mtj.train import Trainer, train


def launch(cfg_path, port, *overrides, heartbeat=100):
    """Process 0 joins by flags, process 1 by the environment variables (MTJ_COORDINATOR, ...)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    by_flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    by_env = {"MTJ_COORDINATOR": f"127.0.0.1:{port}", "MTJ_NUM_PROCESSES": "2", "MTJ_PROCESS_ID": "1"}
    return [subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(cfg_path),
                              "--no-progress", *flags, "--heartbeat-timeout", str(heartbeat), *overrides],
                             cwd=REPO, env={**env, **more}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for flags, more in [(by_flags, {}), ([], by_env)]]


def test_two_processes_train_like_one(tmp_path):
    cfg = config(tmp_path, cores_per_replica=4, per_replica_batch=4, total_steps=5, ckpt_every=5,
                 model_dir=str(tmp_path / "two"))
    cfg.save(tmp_path / "cfg.json")
    procs = launch(tmp_path / "cfg.json", free_port())
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    assert jax.process_count() == 1
    train(cfg.replace(model_dir=str(tmp_path / "one")), progress=False)  # one process, 8 devices
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    np.testing.assert_allclose([two[s]["loss"] for s in range(1, 6)], [one[s]["loss"] for s in range(1, 6)],
                               atol=1e-5, rtol=0)
    # the checkpoint both processes wrote together restores in this single process
    tokens = np.arange(12)[None]
    np.testing.assert_allclose(mtj.load(tmp_path / "two", mp=4).logits(tokens),
                               mtj.load(tmp_path / "one", mp=4).logits(tokens), atol=1e-5, rtol=0)


def test_survivor_exits_when_a_process_dies(tmp_path):
    cfg = config(tmp_path, cores_per_replica=4, per_replica_batch=4, total_steps=100000)
    cfg.save(tmp_path / "cfg.json")
    procs = launch(tmp_path / "cfg.json", free_port(), heartbeat=15)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "metrics.jsonl").is_file() or len(metrics(tmp_path / "run")) < 3:
            assert time.time() < deadline and procs[0].poll() is None, "training did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        start = time.time()
        procs[0].wait(timeout=120)
        assert procs[0].returncode != 0
        assert time.time() - start < 120
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_fsdp_splits_large_leaves_and_matches(tmp_path):
    mesh = make_mesh(mp=4, dp=2)
    losses = {}
    for fsdp in (False, True):
        cfg = config(tmp_path, cores_per_replica=4, per_replica_batch=2, fsdp=fsdp, d_model=256, n_heads=8)
        trainer = Trainer(cfg, mesh)
        state = trainer.init(seed=0)
        batch = np.random.RandomState(0).randint(0, 50257, (1, 4, 33)).astype(np.int32)
        losses[fsdp] = []
        for _ in range(5):
            state, m = trainer.step(state, batch)
            losses[fsdp].append(float(m["loss"]))
        if fsdp:
            big = [leaf for leaf in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]})
                   if leaf.nbytes > 2**20]
            assert len(big) == 12  # wte, lm_head, fc_in, fc_out: parameter, Adam mu and nu
            for leaf in big:
                shard = leaf.addressable_shards[0].data
                assert shard.size * 8 == leaf.size, (leaf.shape, leaf.sharding.spec)  # split over dp and mp
    np.testing.assert_allclose(losses[True], losses[False], atol=1e-5, rtol=0)
