"""uda-ray's own cache folder: what it builds on first use and the locks that guard the builds.

Anything an implicit first-use path writes that is not the data a user asked for (the
embedded pretrained weights and their pretraining domain, the lock that lets concurrent
trials wait for one benchmark generation) goes here, never into or beside a user's data
folder: a data folder is the user's, and a file appearing in or next to it is a surprise
(and, beside a shared or read-only dataset, may not even be writable).

The folder is ``$UDA_RAY_CACHE`` if set, else ``$XDG_CACHE_HOME/uda-ray``, else
``~/.cache/uda-ray`` (the XDG convention). Deleting it loses nothing but time: its contents
are rebuilt on next use.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """The cache folder (see the module docstring), absolute; read at each call, so a test or
    a trial that sets ``UDA_RAY_CACHE`` gets its own."""
    if path := os.environ.get("UDA_RAY_CACHE"):
        return Path(path).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "uda-ray").resolve()


def make_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (a folder in the cache); a read-only home is a user's setting, said in one
    line with the way out rather than as a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create uda-ray's cache folder ({e.strerror}); set UDA_RAY_CACHE to a "
                        f"writable folder") from None
    return path


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file that guards building ``path``: ``<cache>/locks/<sha1 of the resolved
    path>.lock`` (the folder is created); the same path gives the same lock in every process."""
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()
    return make_dir(cache_dir() / "locks") / f"{key}.lock"
