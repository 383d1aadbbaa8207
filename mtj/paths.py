"""How a path a user gives becomes a path object.

Every user path may be a local path or a URL of a scheme `etils.epath` (which
Orbax itself uses) understands, such as `gs://bucket/dir` on a TPU pod.
"""

from __future__ import annotations

import os

from etils import epath


def user_path(path: str | os.PathLike) -> epath.Path:
    """A URL as given; a local path with `~` expanded and made absolute (Orbax wants absolute paths)."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(text).expanduser().absolute()
