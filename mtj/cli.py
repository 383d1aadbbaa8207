"""What every command does with a user's mistake: one line on stderr that names it, exit status 1."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from mtj.checkpoint import CheckpointError
from mtj.config import QUANTIZE, ConfigError
from mtj.lock import LockHeld
from mtj.tfrecord import RecordError

USER_ERRORS = (ConfigError, CheckpointError, LockHeld, RecordError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A command's parser: every option's default shown, and --version."""
    from importlib.metadata import PackageNotFoundError, version

    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    try:
        release = version("mtj")
    except PackageNotFoundError:  # a checkout that is not installed
        release = "unknown"
    ap.add_argument("--version", action="version", version=f"{prog} (mtj) {release}")
    return ap


def add_load_options(ap: argparse.ArgumentParser, dtype_help: str) -> None:
    """--dtype and --quantize: how a command that loads a model (`mtj.load`) holds it."""
    ap.add_argument("--dtype", default=None, help=dtype_help)
    ap.add_argument("--quantize", choices=QUANTIZE, default=None,
                    help="inference weights: int8 (a scale per output channel) or int4 (a scale per group of 128 "
                         "input rows), quantized at load (default: as the checkpoint stores them)")


def load_overrides(args: argparse.Namespace) -> dict:
    """The config overrides `add_load_options`' options ask `mtj.load` for."""
    return {key: value for key, value in (("quantize", args.quantize), ("dtype", args.dtype)) if value}


def _urls() -> list[str]:
    return [word.split("=", 1)[-1] for word in sys.argv[1:] if "://" in word]


def run(main: Callable[[], None]) -> None:
    """Call `main`; errors a user can fix print as one line instead of a stack trace."""
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # its retry tracebacks; the error below says it once
    try:
        main()
    except USER_ERRORS as e:
        message, urls = str(e), _urls()
        if urls and "://" not in message and isinstance(e, (FileNotFoundError, PermissionError)):
            # gcsfs names objects "b/BUCKET/o/NAME", not as the user wrote them
            hint = "no such bucket or object" if isinstance(e, FileNotFoundError) else "permission denied"
            message = f"{', '.join(urls)}: {hint} ({message})"
        sys.exit(f"error: {message}")
    except OSError as e:  # unreachable storage: aiohttp (gcsfs) and google-auth errors say host, not URL
        if not isinstance(e, ConnectionError) and type(e).__module__.split(".")[0] not in ("aiohttp", "gcsfs", "google"):
            raise
        if not _urls():  # not the user's storage: a download (a harness task's dataset from the hub, ...)
            sys.exit(f"error: a download failed: {e}. What is not on this machine needs the network (and no "
                     "HF_HUB_OFFLINE=1); or give a local path")
        sys.exit(f"error: cannot reach {', '.join(_urls())}: {e}. Check the network and the "
                 "credentials (for a local emulator, STORAGE_EMULATOR_HOST)")
