#!/usr/bin/env python
"""`mtj-sample` from a checkout: see mtj/commands/sample.py, or --help."""

from mtj.commands.sample import cli

if __name__ == "__main__":
    cli()
