#!/usr/bin/env python
"""`mtj-from-hf` from a checkout: see mtj/commands/from_hf.py, or --help."""

from mtj.commands.from_hf import cli

if __name__ == "__main__":
    cli()
