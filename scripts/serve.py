#!/usr/bin/env python
"""`mtj-serve` from a checkout: see mtj/commands/serve.py, or --help."""

from mtj.commands.serve import cli

if __name__ == "__main__":
    cli()
