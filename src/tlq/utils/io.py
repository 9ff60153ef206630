"""Atomic file output: a crash never leaves a half-written file in the user's place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tlq.config import ConfigError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_output(path: str | Path, overwrite: bool, what: str = "output") -> Path:
    """Refuse to clobber an existing output unless the user said ``--overwrite``.

    Checked before any long work starts, so a mistake costs seconds, not an hour of calibration.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{what} {str(path)!r} already exists; choose another path or pass --overwrite")
    return path
