#!/usr/bin/env python
"""Will this config train on that TPU pod? Compiles the real train step for the topology here and reports memory."""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v3-8")  # quiets libtpu's host probing; the topology is explicit
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

from mtj.compile_check import check  # noqa: E402
from mtj.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="v3-8, v3-32, v4-32, v5e-8, ... or cpu-N")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. remat=true")
    args = ap.parse_args()
    report = check(load_config(args.config, args.overrides), args.topology)
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:20s} {value}")
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    main()
