#!/usr/bin/env python
"""`mtj-train` from a checkout: see mtj/commands/train.py, or --help."""

from mtj.commands.train import cli

if __name__ == "__main__":
    cli()
