"""Opening a TFRecord dataset at scale: time, host memory per record and bytes fetched from a bucket, mtj
(record-offset sidecars) against a baseline revision (a scan of every record's header), side by side.

Builds files of M short records (each file a copy of one, so building is quick), in a local folder and in a
fake-gcs-server on 127.0.0.1 reached through a byte-counting proxy, then opens the dataset with
`TFRecordSource` in a fresh process per side and size: seconds, resident memory kept after opening (per
record), and the bytes the bucket sent. The baseline's tree is a git worktree of `--baseline`.

    ../shared/bin/offline .venv/bin/python benchmarks/data_open.py --records 1000000,10000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common import REPO, cpu_name, emulator, revision_tree

sys.path.insert(0, str(REPO))

WORKER = r"""
import gc, json, sys, time
sys.path.insert(0, sys.argv[1])  # the side's tree
import numpy as np
import mtj.data
assert mtj.data.__file__.startswith(sys.argv[1]), mtj.data.__file__

def status(field):  # kB in /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

if sys.argv[2].startswith("gs://"):  # the storage client's own imports are not the dataset's memory
    import fsspec
    fsspec.filesystem("gs")
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from here
before = status("VmRSS")
t = time.perf_counter()
source = mtj.data.TFRecordSource(sys.argv[2], int(sys.argv[3]))
seconds = time.perf_counter() - t
gc.collect()
print(json.dumps({"seconds": seconds, "records": len(source), "kept_bytes": status("VmRSS") - before,
                  "peak_bytes": status("VmHWM") - before}))
"""


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of `port`, counting the bytes the server sends back."""

    def __init__(self, port: int):
        self.target, self.received = port, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if counted:
                    with self.lock:
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def build(folder: Path, files: int, per_file: int, seq: int) -> int:
    """`files` copies of one file of `per_file` records of seq + 1 random ids (with its sidecar); data bytes."""
    import numpy as np

    from mtj.tfrecord import SIDECAR, write_tfrecords

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = folder / f"part-00000_{per_file}.tfrecords"
    write_tfrecords(first, rng.integers(0, 50257, (per_file, seq + 1)))
    names = [first.name]
    for f in range(1, files):
        names.append(f"part-{f:05d}_{per_file}.tfrecords")
        shutil.copyfile(first, folder / names[-1])
        shutil.copyfile(str(first) + SIDECAR, folder / (names[-1] + SIDECAR))
    (folder / "data.index").write_text("".join(n + "\n" for n in names))
    return files * first.stat().st_size


def upload(folder: Path, prefix: str) -> None:
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.put([str(p) for p in sorted(folder.iterdir())], [f"{prefix}/{p.name}" for p in sorted(folder.iterdir())])


def open_once(tree: Path, index: str, seq: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(tree), index, str(seq)], capture_output=True, text=True,
                         env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default="100000,1000000,10000000", help="dataset sizes, comma-separated")
    ap.add_argument("--per-file", type=int, default=50_000,
                    help="records per file (create_tfrecords' default: 1M records are 20 files)")
    ap.add_argument("--seq", type=int, default=63, help="records hold seq + 1 tokens")
    ap.add_argument("--baseline", default="3dfade8", help="the revision to compare with (before sidecars)")
    ap.add_argument("--no-bucket", action="store_true", help="local files only")
    ap.add_argument("--bucket-records", type=int, default=10_000_000,
                    help="the largest size also measured in the bucket (the emulator holds it in memory)")
    ap.add_argument("--bucket-baseline-records", type=int, default=100_000,
                    help="the largest size the baseline opens in the bucket (it downloads all of it, slowly)")
    args = ap.parse_args()
    sizes = [int(n) for n in args.records.split(",")]
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); files of {args.per_file} records of {args.seq + 1} tokens; "
          f"baseline {args.baseline}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        gcs = None if args.no_bucket else emulator(tmp)
        proxy = CountingProxy(gcs[1]) if gcs else None
        env = {**os.environ}
        try:
            with revision_tree(args.baseline, tmp / "baseline") as base:
                sides = {"baseline": base, "mtj": REPO}
                print(f"{'records':>10} {'where':>6} {'side':>8} {'open s':>8} {'us/rec':>7} {'kept B/rec':>10} "
                      f"{'peak B/rec':>10} {'fetched':>12} {'of data':>8}", flush=True)
                for n in sizes:
                    folder = tmp / f"data-{n}"
                    data_bytes = build(folder, max(1, n // args.per_file), min(n, args.per_file), args.seq)
                    wheres = [("local", str(folder / "data.index"))]
                    if gcs and n <= args.bucket_records:
                        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{gcs[1]}"
                        upload(folder, f"gs://bench/data-{n}")
                        wheres.append(("bucket", f"gs://bench/data-{n}/data.index"))
                    rows = {}
                    for where, index in wheres:
                        side_env = {**env, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}"} if proxy else env
                        for side, tree in sides.items():
                            if where == "bucket" and side == "baseline" and n > args.bucket_baseline_records:
                                continue
                            if proxy:
                                proxy.received = 0
                            r = open_once(tree, index, args.seq, side_env)
                            fetched = proxy.received if where == "bucket" else 0
                            rows[where, side] = r
                            print(f"{r['records']:>10} {where:>6} {side:>8} {r['seconds']:>8.2f} "
                                  f"{1e6 * r['seconds'] / r['records']:>7.3f} {r['kept_bytes'] / r['records']:>10.1f} "
                                  f"{r['peak_bytes'] / r['records']:>10.1f} "
                                  f"{fetched if where == 'bucket' else '-':>12} "
                                  f"{f'{100 * fetched / data_bytes:.3f}%' if where == 'bucket' else '-':>8}", flush=True)
                        if (where, "baseline") not in rows:
                            continue
                        ratio = rows[where, "baseline"]["seconds"] / rows[where, "mtj"]["seconds"]
                        print(f"{'':>10} {where:>6} mtj opens {ratio:.1f}x faster than the baseline "
                              f"(data: {data_bytes / 1e6:.0f} MB)", flush=True)
                    shutil.rmtree(folder)
        finally:
            if gcs:
                gcs[0].terminate()


if __name__ == "__main__":
    main()
