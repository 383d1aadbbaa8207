#!/usr/bin/env python
"""Plant each known bug (tests/planted/bugs.py) in a temporary copy of this checkout and run the test
that names it: every bug must be caught. Prints one line per bug and exits 1 if any survives.

Run by hand, inside ../shared/bin/offline (about 10 minutes on 2 cores), after changing a test or the
code a bug lives in:  ../shared/bin/offline .venv/bin/python tests/planted/run.py [-k WORD]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bugs import BUGS

REPO = Path(__file__).resolve().parents[2]
# the copy is not beside ../shared: it finds the assets where this checkout does (tests/conftest.py)
ASSETS = {} if "MTJ_ASSETS" in os.environ or not (REPO.parent / "shared" / "assets").is_dir() else \
    {"MTJ_ASSETS": str(REPO.parent / "shared" / "assets")}


def copy_checkout(to: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)


def plant(root: Path, edits: list[tuple[str, str, str]]) -> None:
    for file, text, replacement in edits:
        source = (root / file).read_text()
        if source.count(text) != 1:
            raise SystemExit(f"{file}: the text to replace occurs {source.count(text)} times (the bug list is stale): "
                             f"{text[:80]!r}")
        (root / file).write_text(source.replace(text, replacement))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only the bugs whose name contains this")
    args = ap.parse_args()
    survivors = []
    for bug in [b for b in BUGS if args.k in b.name]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            copy_checkout(root)
            plant(root, bug.edits)
            start = time.monotonic()
            # the copy's mtj comes first on the path (an editable install of this checkout is found after it)
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *bug.test],
                                 cwd=root, capture_output=True, text=True, env={**os.environ, **ASSETS, "PYTHONPATH": str(root)})
            summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
            # caught: a test failed; an error (a fixture that could not start) shows nothing about the bug
            verdict = ("caught" if run.returncode == 1 and " failed" in summary and " error" not in summary
                       else "SURVIVED" if run.returncode == 0 else f"error {run.returncode}")
            print(f"{verdict:8s} {time.monotonic() - start:5.0f}s  {bug.name}  [{' '.join(bug.test)}: {summary}]",
                  flush=True)
            if verdict != "caught":
                survivors.append(bug.name)
    print(f"{len(survivors)} of the planted bugs survived" + (": " + "; ".join(survivors) if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
