"""How a path a user gives becomes a path object, and how files are written so that no reader sees half of one.

Every user path may be a local path or a URL of a scheme `etils.epath` (which
Orbax itself uses) understands, such as `gs://bucket/dir` on a TPU pod. An object
in a bucket appears only when its upload completes, so a whole-object write is
atomic there; locally a file is written aside and renamed into place.
"""

from __future__ import annotations

import contextlib
import glob as glob_module
import os
import shutil
import tempfile
import uuid
from typing import IO, Iterator

import fsspec
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def user_path(path: PathLike) -> epath.Path:
    """A URL as given; a local path with `~` expanded and made absolute (Orbax wants absolute paths)."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(text).expanduser().absolute()


@contextlib.contextmanager
def open_atomic(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write that appears at `path` only when the block succeeds: it is written
    aside and then renamed (locally one rename; in a bucket a server-side copy, then a delete)."""
    path = user_path(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with tmp.open("wb") as f:
            yield f
        if is_remote(path):  # epath's rename refuses an existing target; fsspec's copies over it
            fs, src = fsspec.core.url_to_fs(os.fspath(tmp))
            fs.mv(src, fsspec.core.url_to_fs(os.fspath(path))[1])
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Write a whole file that no reader sees half of."""
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _stream(src: epath.Path, dst: IO[bytes]) -> None:
    """Copy a file's bytes into an open file; memory holds one 16 MiB chunk."""
    with src.open("rb") as f:
        shutil.copyfileobj(f, dst, 16 << 20)


def files_under(path: PathLike) -> list[epath.Path]:
    """Every file below a directory, recursively, sorted (a bucket is listed, not globbed with **)."""
    root = user_path(path)
    if not root.is_dir():
        return []
    if is_remote(root):  # epath's walk drops the scheme of a bucket's paths
        scheme = os.fspath(root).split("://")[0]
        fs, stripped = fsspec.core.url_to_fs(os.fspath(root))
        return sorted(user_path(f"{scheme}://{f}") for f in fs.find(stripped))
    return sorted(root / d / f for d, _, names in root.walk() for f in names)


def glob(pattern: PathLike) -> list[epath.Path]:
    """Paths matching a glob, sorted; `**` spans directories on local disks."""
    text = os.fspath(user_path(pattern))
    if not is_remote(text):
        return sorted(user_path(p) for p in glob_module.glob(text, recursive=True))
    wild = min((i for i in (text.find(c) for c in "*?[") if i >= 0), default=-1)
    if wild < 0:
        path = user_path(text)
        return [path] if path.exists() else []
    base = text.rfind("/", 0, wild)
    return sorted(user_path(text[:base]).glob(text[base + 1:]))


def refuse_overwrite(out: PathLike) -> None:
    """Outputs are never written over existing data."""
    out = user_path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; remove it or choose another path")


@contextlib.contextmanager
def published_dir(out: PathLike, last: tuple[str, ...] = ("config.json",)) -> Iterator[epath.Path]:
    """A fresh local directory to write an output into; when the block succeeds it becomes `out`.

    Locally the directory is renamed into place (one atomic step). For a bucket each file is
    uploaded whole, the files named in `last` after all others, so that a reader who finds
    those (transformers looks for config.json first) finds a complete directory.
    """
    out = user_path(out)
    refuse_overwrite(out)
    remote = is_remote(out)
    if not remote:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=None if remote else out.parent))
    try:
        yield tmp
        if remote:
            files = sorted(files_under(tmp), key=lambda p: (p.name in last, str(p)))
            for f in files:
                with open_atomic(out / os.fspath(f.relative_to(tmp))) as dst:
                    _stream(f, dst)
        else:
            _as_if_created(tmp)
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, for every thread at once)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    return 0o022


def _as_if_created(root: epath.Path) -> None:
    """The permissions a directory and files made in place would have had: mkdtemp makes a private (0700)
    directory, and some writers make private (0600) files; an output is meant to be shared like any other."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[epath.Path]:
    """`path` itself when it is local; a file or directory in a bucket downloaded into a temporary
    directory (for readers that need a local file: memory-mapped safetensors, tokenizers)."""
    path = user_path(path)
    if not is_remote(path):
        yield path
        return
    tmp = epath.Path(tempfile.mkdtemp(prefix="mtj-download-"))
    try:
        files = [path] if path.is_file() else files_under(path)
        for f in files:
            target = tmp / path.name if f == path else tmp / path.name / os.fspath(f.relative_to(path))
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as dst:
                _stream(f, dst)
        yield tmp / path.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
