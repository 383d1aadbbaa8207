"""One writer per model_dir: a training run holds `model_dir/writer.lock` while it runs.

Two runs writing one directory interleave their metrics and break each other's checkpoints. So a run
creates the lock before it reads or writes anything there: locally a file created only if absent
(O_EXCL), in a bucket an object created only if absent (a generation-0 precondition). It holds the
holder's host, pid and start time and is rewritten every `RENEW_S` seconds while the run lives. A
second run fails at once, naming the holder. A lock whose holder is gone (its pid is not running on
this host, or it was not renewed for `STALE_S` seconds) is taken over with a warning, as is a live one
with `--takeover`; a holder that finds its lock taken stops at its next step without writing more.
On several processes, process 0 holds the lock for the run and all of them share the outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Iterator

import fsspec
import jax
import numpy as np
from jax.experimental import multihost_utils

from mtj.paths import PathLike, is_remote, user_path, write_atomic

LOCK_NAME = "writer.lock"
RENEW_S = 30.0
STALE_S = 300.0  # ten missed renewals: the holder is gone (or cut off from the storage)


class LockHeld(RuntimeError):
    """Another run writes this model_dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(record: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    renewed = time.time() - record.get("renewed", 0)
    return f"host {record.get('host')} pid {record.get('pid')} (started {started}, renewed {renewed:.0f} s ago)"


class WriterLock:
    def __init__(self, model_dir: PathLike, renew_s: float = RENEW_S, stale_s: float = STALE_S):
        self.path = user_path(model_dir) / LOCK_NAME
        self.renew_s, self.stale_s = renew_s, stale_s
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now,
                       "renew_s": renew_s, "id": uuid.uuid4().hex}
        self.lost: dict | None = None  # the record found in place of ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict | None:
        try:
            if is_remote(self.path):  # fetched whole: a listing's cached size may be another writer's
                fs, key = fsspec.core.url_to_fs(os.fspath(self.path))
                return json.loads(fs.cat_file(key))
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # a torn or foreign file: nobody's, so stale

    def stale(self, record: dict) -> str | None:
        """Why the holder of `record` is gone, or None if it may be alive."""
        if not record:
            return "unreadable"
        if record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", 0))):
            return "its process is no longer running"
        if time.time() - record.get("renewed", 0) > self.stale_s:
            return f"not renewed for over {self.stale_s:.0f} s"
        return None

    def _write(self, create: bool = False) -> bool:
        """Write our record; with `create` only if there is no lock (False if there is)."""
        data = json.dumps(self.record).encode()
        if is_remote(self.path):  # one upload: an object is replaced whole
            fs, key = fsspec.core.url_to_fs(os.fspath(self.path))
            try:
                fs.pipe_file(key, data, mode="create" if create else "overwrite")  # create: ifGenerationMatch=0
            except FileExistsError:
                return False
            return True
        if not create:
            write_atomic(self.path, data)
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def acquire(self, takeover: bool = False) -> None:
        for _ in range(3):  # a holder may release between our attempt and our read
            if self._write(create=True):
                break
            held = self.read()
            if held is None:
                continue
            why = self.stale(held)
            if why is None and not takeover:
                raise LockHeld(
                    f"{self.path.parent} is being written by another run: {describe(held)}. Stop that run first; if it "
                    f"is gone, start this one with --takeover, or delete {self.path} (a lock not renewed for "
                    f"{self.stale_s:.0f} s is taken over by itself)")
            reason = why or "--takeover"
            warnings.warn(f"taking over {self.path} from {describe(held)}: {reason}" +
                          ("" if why else f"; if that run still goes, it stops within {held.get('renew_s', RENEW_S):.0f} s"))
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            raise LockHeld(f"could not create {self.path}: other runs keep taking it")
        self._thread = threading.Thread(target=self._renew, name="mtj-writer-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                held = self.read()
                if not held or held.get("id") != self.record["id"]:
                    self.lost = held or {}
                    return
                self.record["renewed"] = time.time()
                self._write()
            except Exception as e:  # noqa: BLE001 -- storage down for a moment (an OSError, or a client's HTTP
                # error after its retries): the next renewal may work, and a dead thread would leave the lock to go stale
                warnings.warn(f"could not renew {self.path}: {e}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and (self.read() or {}).get("id") == self.record["id"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def taken_over(writer: WriterLock | None, model_dir: PathLike, step: int) -> LockHeld:
    """The error that stops a run whose lock another run took (process 0's lock says by whom)."""
    holder = describe(writer.lost) if writer is not None and writer.lost else "see process 0"
    return LockHeld(f"another run took over {user_path(model_dir)}/{LOCK_NAME} ({holder}): this run stops at step "
                    f"{step} without writing more")


@contextlib.contextmanager
def hold(model_dir: PathLike, takeover: bool = False) -> Iterator[WriterLock | None]:
    """The run's lock on model_dir for the block (process 0 holds it; the others get None)."""
    lock = WriterLock(model_dir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire(takeover)
        except Exception as e:  # noqa: BLE001 -- raised below, after the other processes hear of it
            error = e
    if jax.process_count() > 1 and multihost_utils.process_allgather(np.array(error is not None)).any() and error is None:
        raise LockHeld(f"process 0 could not lock {user_path(model_dir)}: see its error")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
