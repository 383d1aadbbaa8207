"""One writer per model_dir: a second run fails at once naming the first, which goes on untouched; a
lock whose holder is gone is taken over with a warning (locally and in the emulator bucket)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import mtj

from conftest import REPO
from test_faults import FaultyStorage
from test_train import config, metrics, run_cli
from mtj import lock
from mtj.paths import user_path, write_atomic
from mtj.train import train


@pytest.fixture(params=["local", "bucket"])
def model_dir(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("gcs_dir")


def test_the_lock_names_its_holder_and_is_taken_over_only_when_gone(model_dir):
    first = lock.WriterLock(model_dir, renew_s=0.2)
    first.acquire()
    path = user_path(model_dir) / lock.LOCK_NAME
    held = json.loads(path.read_text())
    assert held["pid"] == os.getpid() and held["host"] and held["started"] <= time.time()
    with pytest.raises(lock.LockHeld, match=f"is being written by another run: host {held['host']} pid {os.getpid()} "
                                            r"\(started .*\).*--takeover.*writer.lock"):
        lock.WriterLock(model_dir).acquire()
    time.sleep(0.5)
    assert json.loads(path.read_text())["renewed"] > held["renewed"]  # renewed while held
    assert first.lost is None

    # --takeover takes a live lock; the holder finds out at its next renewal
    second = lock.WriterLock(model_dir, renew_s=0.2)
    with pytest.warns(UserWarning, match=f"taking over .*pid {os.getpid()}.*--takeover; if that run still goes"):
        second.acquire(takeover=True)
    deadline = time.time() + 10
    while first.lost is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.lost and first.lost["id"] == second.record["id"]
    first.release()  # leaves the lock it lost alone
    assert json.loads(path.read_text())["id"] == second.record["id"]
    second.release()
    assert not path.exists()

    # gone holders: a dead pid on this host; another host's lock not renewed for STALE_S; a torn file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    records = {"its process is no longer running": {**held, "pid": int(dead.stdout)},
               "not renewed for over 300 s": {**held, "host": "elsewhere", "renewed": time.time() - 301}}
    for reason, record in records.items():
        write_atomic(path, json.dumps(record))
        with pytest.warns(UserWarning, match=f"taking over .*: {reason}"):
            lock.WriterLock(model_dir).acquire()
        assert json.loads(path.read_text())["pid"] == os.getpid()
    write_atomic(path, json.dumps({**held, "host": "elsewhere", "renewed": time.time() - 200}))
    with pytest.raises(lock.LockHeld, match="host elsewhere"):  # another host's, renewed 200 s ago: alive
        lock.WriterLock(model_dir).acquire()
    write_atomic(path, b"{\"host\": ")
    with pytest.warns(UserWarning, match="unreadable"):
        taken = lock.WriterLock(model_dir)
        taken.acquire()
    taken.release()


HOLD = """import json, sys, time, warnings
from mtj import lock
held = lock.WriterLock(sys.argv[1], renew_s=0.2)
held.acquire()
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    time.sleep(4)
print(json.dumps({"lost": held.lost, "renewed_ago": time.time() - held.read()["renewed"], "said": [str(w.message) for w in said]}))
held.release()
"""


def test_renewal_outlives_storage_errors(gcs_dir):
    """Reads of the lock fail with HTTP errors the storage client gives up on, for 1.5 s: the holder warns and
    goes on renewing (a renewal thread that died would let the lock go stale under a live run)."""
    proxy = FaultyStorage("writer.lock?alt=media", 400, seconds=1.5)  # (only renewals read it)
    try:
        done = subprocess.run([sys.executable, "-c", HOLD, gcs_dir], cwd=REPO, env=proxy.env(), capture_output=True,
                              text=True, timeout=120)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert proxy.refused >= 3 and result["lost"] is None and result["renewed_ago"] < 1, result
    assert any("could not renew" in w for w in result["said"]), result
    assert not (user_path(gcs_dir) / lock.LOCK_NAME).exists()


def launch(cfg_path, *args):
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(cfg_path), "--no-progress",
                             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("together", [False, True], ids=["while_the_first_trains", "both_at_once"])
def test_a_second_run_fails_at_once_and_the_first_goes_on_untouched(tmp_path, model_dir, together):
    cfg = config(tmp_path, total_steps=100000, ckpt_every=5, model_dir=model_dir)
    cfg.save(tmp_path / "cfg.json")

    def holding(run):  # the summary's last line is printed once the run holds the lock
        while not (line := run.stdout.readline()).startswith("data: "):
            assert line or run.poll() is None, run.stderr.read()

    runs = [launch(tmp_path / "cfg.json")]
    if not together:
        holding(runs[0])
    began = time.time()
    runs.append(launch(tmp_path / "cfg.json"))
    while all(r.poll() is None for r in runs):  # whichever locked first goes on
        assert time.time() - began < 60
        time.sleep(0.05)
    second = next(r for r in runs if r.poll() is not None)
    first = next(r for r in runs if r is not second)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 1 and time.time() - began < 30, err
    assert err.strip().splitlines()[-1].startswith(f"error: {user_path(model_dir)} is being written by another run: ")
    assert f"pid {first.pid} " in err and "--takeover" in err
    if together:
        holding(first)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    rows = [json.loads(r) for r in (user_path(model_dir) / "metrics.jsonl").read_text().splitlines()]
    stopped = mtj.checkpoint.complete_steps(model_dir)[0]
    assert [r["step"] for r in rows] == list(range(1, stopped + 1))  # each step once: nothing of the second run
    train(cfg.replace(model_dir=str(tmp_path / "ref"), total_steps=stopped), progress=False)
    expected = metrics(tmp_path / "ref")
    assert [r["loss"] for r in rows] == [expected[s]["loss"] for s in range(1, stopped + 1)]
    assert not (user_path(model_dir) / lock.LOCK_NAME).exists()  # released at the end


def test_a_killed_runs_lock_is_taken_over_with_a_warning(tmp_path):
    cfg = config(tmp_path, total_steps=6, ckpt_every=3)
    cfg.save(tmp_path / "cfg.json")
    killed = run_cli(tmp_path / "cfg.json", kill=("after-step", 4))
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "run" / lock.LOCK_NAME).read_text())["host"]  # left behind
    again = launch(tmp_path / "cfg.json")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "taking over" in err and "its process is no longer running" in err
    assert "resuming" in out and "from step 3" in out
