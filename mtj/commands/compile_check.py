"""Will this config train on that TPU pod? Compiles the real train step for the topology here and reports
memory per device; when it does not fit, the overrides that make it fit, or the smallest slice that holds it.
With --decode-only (or --quantize), generation alone: its memory and the largest batch that fits."""

import json
import os
import re
import shlex
import sys

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v3-8")  # quiets libtpu's host probing; the topology is explicit
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

from mtj.compile_check import TOPOLOGIES, check, check_inference, remat_table
from mtj.config import QUANTIZE, load_config
from mtj.cli import parser, run


def overrides(fixes: dict) -> str:
    """key=value words a shell takes as they are printed."""
    return " ".join(f"{k}={v if isinstance(v, str) else shlex.quote(json.dumps(v, separators=(',', ':')))}"
                    for k, v in fixes.items())


def memory(r: dict) -> str:
    frozen = f" + frozen base {r['frozen_base_gib']}" if "frozen_base_gib" in r else ""  # (LoRA)
    parts = [f"parameters {r['parameters_gib']} + optimizer state {r['optimizer_state_gib']}{frozen}"
             f" (arguments {r['arguments_gib']})" if "parameters_gib" in r else f"arguments {r['arguments_gib']}"]
    parts += [f"{k} {r[k + '_gib']}" for k in ("temporaries", "outputs", "total") if r.get(k + "_gib") is not None]
    hbm = f" of {r['hbm_per_device_gib']} HBM" if r.get("hbm_per_device_gib") else ""
    if r.get("hbm_available_gib"):
        hbm += f" ({r['hbm_available_gib']} usable)"
    return ", ".join(parts) + f" GiB per device{hbm}"


def decode_line(d: dict) -> str:
    weights = f"{d['quantize']} weights" if d["quantize"] != "none" else "weights"
    return (f"decode (batch {d['batch']}, {d['prompt']} + {d['new_tokens']} tokens; {weights} {d['weights_gib']}, "
            f"KV cache {d['cache_gib']} GiB per device): " + (memory(d) if d["fits"] else d["error"])
            + f": {'fits' if d['fits'] else 'does not fit'}")


def inference_only(r: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r))
    else:
        print(f"{r['topology']}: {r['devices']} devices, mesh {r['mesh']}")
        print(decode_line(r["decode"]))
        if "largest_batch" in r["decode"]:
            print(f"largest batch that fits (powers of two times {r['decode']['batch']}): {r['decode']['largest_batch']}")
    sys.exit(0 if r["fits"] else 1)


def main() -> None:
    ap = parser("mtj-compile-check", __doc__)
    ap.add_argument("--config", required=True, help="JSON config (keys: docs/config.md) of the run to check")
    ap.add_argument("--topology", required=True, help="a TPU slice (v3-8, v4-32, v5e-8, v5p-8, v6e-8, ...) or cpu-N")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--no-advice", action="store_true", help="do not search for fixes when it does not fit")
    ap.add_argument("--no-decode", action="store_true", help="do not also compile generation")
    ap.add_argument("--remat-policies", action="store_true",
                    help="also compile the step under each remat_policy (and without remat): a memory table")
    ap.add_argument("--decode-only", action="store_true",
                    help="compile generation alone (no train step): its memory and the largest batch that fits")
    ap.add_argument("--quantize", choices=QUANTIZE, default=None,
                    help="generation with int8/int4 weights, as a quantized checkpoint holds them (implies --decode-only)")
    ap.add_argument("--batch", type=int, default=8, help="rows of the generation compiled")
    ap.add_argument("--context", type=int, default=1024, help="tokens per row of the generation (half prompt, half new)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. remat=true")
    args = ap.parse_args()
    if args.topology not in TOPOLOGIES and not re.fullmatch(r"cpu(-[1-9]\d*)?", args.topology):
        ap.error(f"unknown --topology '{args.topology}'; known: {', '.join(TOPOLOGIES)}, cpu-N")
    cfg = load_config(args.config, args.overrides)
    if args.decode_only or args.quantize:
        return inference_only(check_inference(cfg, args.topology, args.quantize or "none", args.batch, args.context),
                              args.json)
    r = check(cfg, args.topology, advise=not args.no_advice, decode=not args.no_decode)
    if args.remat_policies:
        r["remat_policies"] = remat_table(cfg, args.topology)
    if args.json:
        print(json.dumps(r))
        sys.exit(0 if r["fits"] else 1)
    print(f"{r['topology']}: {r['devices']} devices, mesh {r['mesh']}, fsdp {r['fsdp']}, "
          f"{r['tokens_per_step']:,} tokens per step" + (f" (with {overrides(r['adjusted'])}: the config's "
                                                       "does not divide the slice)" if r["adjusted"] else ""))
    print(f"train step: {memory(r)}: {'fits' if r['fits'] else 'does not fit'}")
    if not r["fits"] and r.get("error"):
        print(f"  {r['error']}")
    if "decode" in r:
        print(decode_line(r["decode"]))
    if "remat_policies" in r:
        print(f"{'remat_policy':14s}{'temporaries GiB':>16s}{'total GiB':>11s}  fits")
        for row in r["remat_policies"]:
            print(f"{row['remat_policy']:14s}{row['temporaries_gib']!s:>16s}{row['total_gib']!s:>11s}  {row['fits']}")
    if r.get("fixes"):
        print(f"fits with: {overrides(r['fixes'])}   (mesh {r['fixed']['mesh']}, total {r['fixed']['total_gib']} GiB)")
    elif not r["fits"] and not args.no_advice:
        print(f"no combination of remat, grad_accum_dtype, fsdp, cores_per_replica and per_replica_batch fits "
              f"on {r['topology']}")
        s = r["smallest_topology"]
        if s:
            print(f"smallest slice that fits: {s['topology']}" + (f" with {overrides(s['fixes'])}" if s["fixes"] else "")
                  + f"   (mesh {s['mesh']}, total {s['total_gib']} GiB per device)")
        else:
            print("no slice of that generation in the table holds it")
    if r.get("lora"):
        print(f"or train LoRA adapters on the frozen model, which fits here with: {overrides(r['lora']['overrides'])}"
              f"   (frozen base {r['lora']['frozen_base_gib']}, total {r['lora']['total_gib']} GiB per device)")
    sys.exit(0 if r["fits"] else 1)


def cli() -> None:
    """`mtj-compile-check` (and `python scripts/compile_check.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
