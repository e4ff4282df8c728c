"""File-boundary helpers: atomic writes, overwrite protection, JSON reading with culprit-naming errors.

Every output is written to a temporary file in the destination folder and renamed into place, so an interrupted run
never leaves a half-written file behind, and an existing file is only replaced when the caller says ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rclip_core.errors import RclipError


def check_writable(path: str | os.PathLike, *, force: bool, create_parent: bool = False) -> Path:
    """Refuse to overwrite ``path`` unless ``force`` (or when it is a folder). Creates nothing unless
    ``create_parent``: a check made before any work leaves no empty folder behind when the run is refused or fails
    (:func:`atomic_open` makes the folder when the output is written). Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise RclipError(f"{p} is a folder, not a file")
    if p.exists() and not force:
        raise RclipError(f"{p} already exists; pass --force to overwrite it")
    if create_parent:
        p.parent.mkdir(parents=True, exist_ok=True)
    return p


def check_outputs(*paths: str | os.PathLike, force: bool) -> None:
    """:func:`check_writable` for each of a command's outputs, before any heavy import or model build."""
    for p in paths:
        check_writable(p, force=force)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, force: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error delete it.

    Args:
        path: destination.
        mode: ``"w"`` (text, UTF-8) or ``"wb"``.
        force: when False, an existing ``path`` raises :class:`RclipError` before anything is written.
    """
    p = check_writable(path, force=force)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        # mkstemp makes the file 0600; a finished output gets the mode any other new file would (the user's umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, *, force: bool = True, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically."""
    with atomic_open(path, "w", force=force) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, force: bool = True) -> Path:
    """Write ``text`` atomically."""
    with atomic_open(path, "w", force=force) as f:
        f.write(text)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike, *, force: bool = True) -> Path:
    """``torch.save`` atomically (imports torch lazily so non-torch modules can use this file)."""
    import torch

    with atomic_open(path, "wb", force=force) as f:
        torch.save(obj, f)
    return Path(path)


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing file or a syntax error into a one-line :class:`RclipError`."""
    p = Path(path)
    if not p.is_file():
        raise RclipError(f"{what} not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RclipError(f"{p}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise RclipError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
