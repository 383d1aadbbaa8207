#!/usr/bin/env python
"""`mtj-eval` from a checkout: see mtj/commands/eval_harness.py, or --help."""

from mtj.commands.eval_harness import cli

if __name__ == "__main__":
    cli()
