#!/usr/bin/env python
"""`mtj-slim` from a checkout: see mtj/commands/slim.py, or --help."""

from mtj.commands.slim import cli

if __name__ == "__main__":
    cli()
