"""Scale-out: two real processes on 127.0.0.1 train as one mesh; FSDP splits every large leaf."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
from etils.epath import backend
import numpy as np

import mtj
from conftest import REPO
from test_serve import free_port
from test_train import config, metrics
from mtj.paths import user_path
from mtj.sharding import make_mesh
from mtj.train import Trainer, train


def launch(cfg_path, port, *overrides, heartbeat=100, progress=False):
    """Process 0 joins by flags, process 1 by the environment variables (MTJ_COORDINATOR, ...)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    by_flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    by_env = {"MTJ_COORDINATOR": f"127.0.0.1:{port}", "MTJ_NUM_PROCESSES": "2", "MTJ_PROCESS_ID": "1"}
    return [subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(cfg_path),
                              *([] if progress else ["--no-progress"]), *flags, "--heartbeat-timeout", str(heartbeat), *overrides],
                             cwd=REPO, env={**env, **more}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for flags, more in [(by_flags, {}), ([], by_env)]]


class Output:
    """A process's output read as it comes (a bar's updates end in \\r, not lines)."""

    def __init__(self, proc):
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(proc.stdout.fileno(),), daemon=True)
        self.thread.start()

    def _read(self, fd):
        while chunk := os.read(fd, 65536):
            self.text += chunk.decode(errors="replace")

    def step(self, total):
        return max(map(int, re.findall(rf"(\d+)/{total} ", self.text)), default=0)


def sigterm_on(procs, outputs, text, to=(0, 1)):
    """SIGTERM to processes `to` once the lead has printed `text`."""
    deadline = time.time() + 300
    while text not in outputs[0].text:
        assert time.time() < deadline and procs[0].poll() is None, outputs[0].text[-3000:]
        time.sleep(0.01)
    for i in to:
        procs[i].send_signal(signal.SIGTERM)


def sigterm_at_random(procs, outputs, total, rng):
    """SIGTERM twice to both processes (the second during the save) within a random step of the first
    quarter; returns the lead's progress bar's step at the signal."""
    at = int(rng.integers(1, total // 4))
    deadline = time.time() + 300
    while outputs[0].step(total) < at:
        assert time.time() < deadline and procs[0].poll() is None, outputs[0].text[-3000:]
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    shown = outputs[0].step(total)
    for _ in range(2):
        for p in procs:
            p.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    return shown


TOTAL = 40


def test_two_processes_train_like_one_stop_on_sigterm_and_resume_with_other_counts(tmp_path, gcs_dir, monkeypatch):
    """Two real processes train as one mesh, like one process; SIGTERM to both, or to one of them, stops both
    after the same step, saved, and the run goes on exactly in 2 processes, in 1, and back in 2 (in a bucket)."""
    cfg = config(tmp_path, cores_per_replica=4, per_replica_batch=4, total_steps=TOTAL, ckpt_every=0,
                 model_dir=gcs_dir)
    cfg.save(tmp_path / "cfg.json")
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # the bar shows every step

    def two(stop):
        procs = launch(tmp_path / "cfg.json", free_port(), progress=True)
        outputs = [Output(p) for p in procs]
        try:
            at = stop(procs, outputs)
            for p, out in zip(procs, outputs):
                p.wait(timeout=300)  # (a run takes under a minute)
                out.thread.join()
                assert p.returncode == 0, out.text[-3000:]
        finally:
            for p in procs:
                p.kill()
        return outputs[0].text, at

    def losses(run):
        backend.fsspec_backend._get_filesystem("gcs").invalidate_cache()  # another process rewrote the file
        rows = [json.loads(r) for r in (user_path(run) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        return [r["loss"] for r in rows]

    assert jax.process_count() == 1
    train(cfg.replace(model_dir=str(tmp_path / "one")), progress=False)  # one process, 8 devices
    expected = losses(tmp_path / "one")
    out, shown = two(lambda procs, outs: sigterm_at_random(procs, outs, TOTAL, np.random.default_rng()))
    stopped = mtj.checkpoint.complete_steps(gcs_dir)[0]
    assert shown <= stopped <= shown + 2, (shown, stopped)  # the step running, or the next for a signal between them
    assert f"stopped by SIGTERM after step {stopped}: checkpoint" in out, out
    np.testing.assert_allclose(losses(gcs_dir), expected[:stopped], atol=1e-4, rtol=0)  # two processes train like one
    # a signal to process 1 alone, during the restore and compilation, stops both after their first step
    out, _ = two(lambda procs, outs: sigterm_on(procs, outs, "\ndata: ", to=(1,)))
    assert f"stopped by a signal to another process after step {stopped + 1}: checkpoint" in out, out
    # 2 processes -> 1 (two steps) -> 2 (to the end): the same samples (data positions) and losses
    train(cfg.replace(total_steps=stopped + 3), progress=False)
    np.testing.assert_allclose(losses(gcs_dir), expected[:stopped + 3], atol=1e-4, rtol=0)
    began = time.time()  # a notice after the last step changes nothing, and nothing waits for it
    out, _ = two(lambda procs, outs: sigterm_on(procs, outs, "\ntrained steps"))
    assert time.time() - began < 90 and f"resuming {user_path(gcs_dir)} from step {stopped + 3}" in out, out
    np.testing.assert_allclose(losses(gcs_dir), expected, atol=1e-4, rtol=0)
    assert mtj.checkpoint.read_meta(gcs_dir)["data"] == mtj.checkpoint.read_meta(tmp_path / "one")["data"]
    # the checkpoint both processes wrote together restores in this single process
    tokens = np.arange(12)[None]
    np.testing.assert_allclose(mtj.load(gcs_dir, mp=4).logits(tokens), mtj.load(tmp_path / "one", mp=4).logits(tokens),
                               atol=5e-4, rtol=0)  # 1.3e-5..7.6e-5 at 40 steps


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
