"""Storage faults injected into real checkpoints, on a local disk and in the emulator bucket: each is
answered by resuming from the step before, or by an error naming the step; nothing earlier changes."""

import hashlib
import http.client
import http.server
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from pathlib import Path

import jax
import fsspec
import numpy as np
import orbax.checkpoint as ocp
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
    fs, root = fsspec.core.url_to_fs(f"{gcs_dir}/run")
    fs.put(f"{template}/", root, recursive=True)  # concurrent uploads
    return epath.Path(f"{gcs_dir}/run")


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



def test_training_resumes_past_a_torn_metrics_line(template, tmp_path):
    run = copy_run(template, "local", tmp_path, None)
    log = tmp_path / "run" / "metrics.jsonl"
    rows = log.read_text()
    log.write_text(rows + '{"step": 7, "loss": 3.1')  # killed mid-write (or a full disk) after step 6 was saved
    _, messages = caught(lambda: train(config(tmp_path, total_steps=7, ckpt_every=2, keep_last=3), progress=False))
    assert any("skipping its torn last line 7" in m for m in messages), messages
    assert log.read_text().startswith(rows)  # every earlier row as it was
    assert sorted(metrics(Path(run))) == list(range(1, 8))


# --- kill -9 while old steps are deleted -------------------------------------------------------

ITEMS = [f"item{i}" for i in range(6)]  # several Orbax items: more files, a longer deletion to land in


def step_args(step: int) -> ocp.args.Composite:
    tree = {f"w{j}": np.full((16,), step * 100 + j, np.float32) for j in range(4)}
    return ocp.args.Composite(**{name: ocp.args.StandardSave(tree) for name in ITEMS})


def assert_restores_to_its_values(run: epath.Path, step: int) -> None:
    items = checkpoint.restore_items(run / f"step_{step}", **{name: ocp.args.StandardRestore() for name in ITEMS})
    for name in ITEMS:
        for j in range(4):
            np.testing.assert_array_equal(items[name][f"w{j}"], np.full((16,), step * 100 + j, np.float32))


# A process that has imported mtj (2 s) forks one child per trial; a child opens the run's manager
# and deletes steps 1-3 through it, as pruning does; the test kills it with SIGKILL meanwhile.
ZYGOTE = r"""
import os, sys, time
from mtj import checkpoint
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        mngr = checkpoint.manager(line.strip())
        print("start", flush=True)
        for step in (1, 2, 3):
            mngr.delete(step)
        print("end", flush=True)
        time.sleep(600)
    print(f"pid {pid}", flush=True)
    os.waitpid(pid, 0)
"""


def deletion_trials(template_of, trials: int) -> None:
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))

    try:
        rng = random.Random(0)
        duration, kept_steps = 0.0, set()
        lo = hi = 0.0  # kill-delay window: above lo something was deleted, below hi something was left
        # At least `trials` kills; more (up to 3x) while the kills have not yet landed mid-deletion, the
        # window narrowing onto it: a loaded machine stretches the deletion unpredictably.
        for n in range(3 * trials + 1):
            if n > trials and len(kept_steps) >= 3:
                break
            run = template_of()
            before = digests(run / "step_4")
            zygote.stdin.write(f"{run}\n")
            zygote.stdin.flush()
            pid, started = None, False
            while pid is None or not started:  # "pid N" and "start", in either order; a killed trial's "end" may precede them
                words = zygote.stdout.readline().split()
                pid = int(words[1]) if words[0] == "pid" else pid
                started = started or words[0] == "start"
            t0 = time.perf_counter()
            if n == 0:  # calibration: how long the deletion takes unkilled
                assert zygote.stdout.readline().strip() == "end"
                duration = time.perf_counter() - t0
                lo, hi = 0.0, 1.2 * duration
            else:
                delay = rng.uniform(lo, hi)
                time.sleep(delay)
            os.kill(pid, signal.SIGKILL)

            listed = checkpoint.complete_steps(run)
            kept_steps.add(tuple(listed))
            if n > 0:
                if listed == [4, 3, 2, 1]:
                    lo = max(lo, delay)
                elif listed == [4]:
                    hi = min(hi, delay)
                if hi - lo < 1e-3:  # timing drifted past the window: open it again
                    lo, hi = 0.0, 1.2 * duration
            for step in listed:  # whatever is still listed restores to exactly its own values
                assert_restores_to_its_values(run, step)
            assert 4 in listed and digests(run / "step_4") == before  # the step not pruned is untouched
            # The next run opens its manager, clears what the kill left, saves and prunes normally.
            mngr = checkpoint.manager(run, keep_last=2)
            mngr.save(5, args=step_args(5))
            mngr.wait_until_finished()
            mngr.close()
            assert checkpoint.complete_steps(run) == [5, 4]
            assert_restores_to_its_values(run, 5)
            assert sorted(p.name for p in run.iterdir()) == ["step_4", "step_5"]
            run.rmtree()  # an emulator bucket slows down as it fills
        # The kills landed at different points of the deletion (not all before or all after it).
        assert len(kept_steps) >= 3, kept_steps
    finally:
        zygote.kill()


@pytest.fixture(scope="session")
def four_steps(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("four") / "run"
    mngr = checkpoint.manager(run)
    for step in (1, 2, 3, 4):
        mngr.save(step, args=step_args(step))
    mngr.wait_until_finished()
    mngr.close()
    return run


def test_kill_during_pruning_never_leaves_a_wrong_step_locally(four_steps, tmp_path):
    copies = iter(range(100))
    deletion_trials(lambda: copy_run(four_steps, "local", tmp_path / str(next(copies)), None), trials=20)


def test_kill_during_pruning_never_leaves_a_wrong_step_in_a_bucket(four_steps, gcs_dir):
    copies = iter(range(100))
    deletion_trials(lambda: copy_run(four_steps, "bucket", Path("/unused"), f"{gcs_dir}/{next(copies)}"), trials=12)


class FaultyStorage:
    """An HTTP proxy on 127.0.0.1 in front of the emulator bucket that answers `status` instead of forwarding
    a request whose URL holds `marker` (as a locked-down GCS would), or only for `seconds` from the first
    such request (as a flaky one would)."""

    def __init__(self, marker: str, status: int, seconds: float | None = None):
        target = urllib.parse.urlsplit(os.environ["STORAGE_EMULATOR_HOST"])
        self.refused, self.first = 0, None
        proxy = self

        def refuse(path: str) -> bool:
            if marker not in urllib.parse.unquote(path):
                return False
            proxy.first = proxy.first or time.monotonic()
            return seconds is None or time.monotonic() - proxy.first < seconds

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if refuse(self.path):
                    proxy.refused += 1
                    reply = b'{"error": {"code": %d, "message": "injected"}}' % status
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict:
        return {**os.environ, "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

    def close(self) -> None:
        self.server.shutdown()


LOAD = ("import sys; from mtj import checkpoint, cli; from mtj.sharding import make_mesh\n"
        "cli.run(lambda: print('loaded', checkpoint.restore_model(sys.argv[1], make_mesh(mp=1, dp=1)).step_dir))")


def test_errors_that_are_not_damage_stop_the_load_and_keep_the_step(template, tmp_path, gcs_dir):
    """Permission denied (locally: a process without root's override of file permissions; in a bucket: 403)
    stops the load naming step 6, instead of quietly taking step 4 as when any error meant damage; 503s for
    3 s are waited out and step 6 loads. Step 6 stays. (503s for good: the storage clients retry for about
    two minutes before mtj's own retries; their classification is checked below.)"""
    local = copy_run(template, "local", tmp_path, None)
    os.chown(local / "step_6" / "params", 65534, 65534)  # owned by nobody, readable by nobody else
    os.chmod(local / "step_6" / "params", 0o700)
    no_override = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run([*no_override, sys.executable, "-c", LOAD, str(local)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and f"cannot read {local}/step_6: PermissionError" in done.stderr, done.stderr[-3000:]
    assert "loaded" not in done.stdout and "does not restore" not in done.stderr
    assert checkpoint.complete_steps(local) == [6, 4, 2]
    bucket = copy_run(template, "bucket", tmp_path, gcs_dir)
    for status, seconds, says in [(403, None, "Forbidden"), (503, 3.0, None)]:
        proxy = FaultyStorage("step_6/params", status, seconds)
        try:
            done = subprocess.run([sys.executable, "-c", LOAD, str(bucket)], capture_output=True, text=True,
                                  timeout=300, env=proxy.env())
        finally:
            proxy.close()
        assert proxy.refused and "does not restore" not in done.stderr, done.stderr[-3000:]
        if says:
            assert done.returncode == 1 and f"cannot read {bucket}/step_6: " in done.stderr and says in done.stderr
        else:  # (the storage clients' own retries may be enough)
            assert done.returncode == 0 and f"loaded {bucket}/step_6" in done.stdout, done.stderr[-3000:]
        assert checkpoint.complete_steps(bucket) == [6, 4, 2]


def test_failures_are_sorted_into_passing_fatal_and_damage():
    from gcsfs.retry import HttpError

    def chained(outer: Exception, cause: Exception) -> Exception:
        outer.__cause__ = cause
        return outer

    for error in [HttpError({"code": 503, "message": "backend"}), ConnectionResetError(), TimeoutError(),
                  ValueError("UNAVAILABLE: connection reset"), chained(ValueError("restore failed"), ConnectionError())]:
        assert checkpoint.kind_of_failure(error) == "passing", error
    for error in [PermissionError(13, "denied"), HttpError({"code": 403, "message": "Forbidden"}), MemoryError(),
                  ValueError("PERMISSION_DENIED: no access"), OSError("Forbidden: b/bucket/o")]:
        assert checkpoint.kind_of_failure(error) == "fatal", error
    for reason in [message for _, message in FAULTS.values()]:
        assert checkpoint.kind_of_failure(ValueError(reason)) == "damage", reason
    assert checkpoint.kind_of_failure(FileNotFoundError("params/_METADATA")) == "damage"
