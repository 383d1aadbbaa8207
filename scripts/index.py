#!/usr/bin/env python
"""`mtj-index` from a checkout: see mtj/commands/index.py, or --help."""

from mtj.commands.index import cli

if __name__ == "__main__":
    cli()
