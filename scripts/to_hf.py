#!/usr/bin/env python
"""`mtj-to-hf` from a checkout: see mtj/commands/to_hf.py, or --help."""

from mtj.commands.to_hf import cli

if __name__ == "__main__":
    cli()
