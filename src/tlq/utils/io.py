"""Atomic file output: a crash never leaves a half-written file in the user's place."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from tlq.config import ConfigError


def atomic_save(path: str | Path, save: Callable[[str], Any]) -> Path:
    """``save(tmp)`` writes the file into a temporary sibling (e.g. ``image.save``); it is renamed over
    ``path`` only once complete, so a crash never leaves a half-written file in the user's place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary sibling, fsync, then rename over ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_save(path, write)


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


def process_tag() -> str:
    """``host-pid``: names a temporary directory by its owner, so a later run can tell a dead one's."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_dead_owner_dirs(base: str | Path, prefix: str) -> list[Path]:
    """Remove directories ``base/{prefix}{host}-{pid}-...`` whose owner (a process *of this host*; another
    host's pid means nothing here) is dead: what a SIGKILL or OOM kill left behind. Returns them."""
    base = Path(base)
    if not base.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
    host, removed = socket.gethostname(), []
    for entry in base.iterdir():
        m = pattern.match(entry.name)
        if m is None or m.group("host") != host or not entry.is_dir():
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def say(text: str) -> None:
    """One line for the user on stderr (``tlq: ...``), said once under torchrun (rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"tlq: {text}", file=sys.stderr, flush=True)


def notice(text: str) -> None:
    """A warning line: ``tlq: warning: ...``."""
    say(f"warning: {text}")


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` so ``with``/``finally`` blocks (spill-dir cleanup) still run.

    torchrun stops the surviving workers with SIGTERM when one fails; Python's default action would
    kill them without unwinding. Call once from the main thread of the CLI.
    """

    def _handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)
