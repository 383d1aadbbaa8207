#!/usr/bin/env python
"""`mtj-create-tfrecords` from a checkout: see mtj/commands/create_tfrecords.py, or --help."""

from mtj.commands.create_tfrecords import cli

if __name__ == "__main__":
    cli()
