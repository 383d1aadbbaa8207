"""The command-line programs: `mtj-NAME` when installed, `python scripts/NAME.py` in a checkout."""
