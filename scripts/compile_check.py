#!/usr/bin/env python
"""`mtj-compile-check` from a checkout: see mtj/commands/compile_check.py, or --help."""

from mtj.commands.compile_check import cli

if __name__ == "__main__":
    cli()
