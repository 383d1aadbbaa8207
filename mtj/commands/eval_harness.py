"""Evaluate a checkpoint (ours or a Hugging Face directory) on lm-evaluation-harness tasks.

Any harness task by name, or a task YAML file; the harness's own definitions, prompts and metrics,
with mtj as the model. LAMBADA (`lambada`, `lambada_openai`) reads $MTJ_ASSETS/eval/lambada_test.jsonl.
"""

import json

import jax

from mtj import distributed, harness
from mtj.cli import add_load_options, load_overrides, parser, run


def main() -> None:
    ap = parser("mtj-eval", __doc__)
    ap.add_argument("--ckpt", required=True, help="model_dir, step directory, or HF model directory")
    ap.add_argument("--tasks", required=True, help="comma-separated harness task names or task YAML files")
    ap.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    ap.add_argument("--include-path", action="append", default=[], help="a folder of task YAMLs (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8, help="requests scored in one forward pass")
    ap.add_argument("--mp", type=int, default=1, help="tensor-parallel devices")
    add_load_options(ap, "compute dtype override, e.g. float32")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the harness's table")
    distributed.add_arguments(ap)
    args = ap.parse_args()
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        ap.error("--tasks names no task")
    if harness.MISSING is not None:
        raise SystemExit(f"error: mtj-eval needs lm-evaluation-harness ({harness.MISSING}): pip install 'mtj[eval]'")
    from lm_eval.utils import make_table

    distributed.initialize(args)
    manager = harness.task_manager(args.include_path)
    tasks = harness.resolve_tasks(names, manager)
    model = harness.MTJLM(ckpt=args.ckpt, mp=args.mp, batch_size=args.batch_size, **load_overrides(args))
    results = harness.run(model, tasks, manager, args.limit, args.num_fewshot)
    if jax.process_index() != 0:  # every process ran the same requests in lockstep; process 0 reports
        return
    if args.json:
        print(json.dumps({"results": results["results"], "n-shot": results.get("n-shot", {}),
                          "n-samples": results.get("n-samples", {})}, default=str))
    else:
        print(make_table(results))


def cli() -> None:
    """`mtj-eval` (and `python scripts/eval_harness.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
