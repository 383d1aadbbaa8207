#!/usr/bin/env python
"""`mtj-from-mtj-v1` from a checkout: see mtj/commands/from_mtj_v1.py, or --help."""

from mtj.commands.from_mtj_v1 import cli

if __name__ == "__main__":
    cli()
