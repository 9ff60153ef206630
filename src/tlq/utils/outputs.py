"""Output directories and files: tlq only ever replaces or deletes what tlq itself wrote.

Rules, checked before any model is loaded (seconds, not a calibration):

* Every output directory tlq writes carries a marker file (``MARKER``) listing the files tlq put there.
  ``--overwrite`` replaces an existing directory only if every file in it is on that list (an empty
  directory qualifies); anything else is refused, naming what is in the way. So ``--overwrite`` pointed
  at a folder of the user's (say, the one holding the source model), or at an earlier output the user
  added a file to, can never delete it.
* No output may be, or contain, a protected input: the model directory, the calibration file, the
  report path. This holds with or without ``--overwrite``.
* The parent must be a (writable) directory, and the disk must have room for the estimated output.
* A new output is staged in an owner-tagged hidden sibling (``.OUT.partial-HOST-PID-xxxx``), marked, and
  renamed into place only when complete; the old one is moved aside first and deleted last. What a
  killed run leaves (its staging dir, a moved-aside old output) is swept by the next successful run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tlq.config import ConfigError
from tlq.utils.io import process_tag, sweep_dead_owner_dirs

MARKER = ".tlq-output.json"
_STAGING = "partial-"
_ASIDE = "old-"
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9a-f]{8}$")  # unowned staging dirs of earlier tlq builds


class OutputError(ConfigError):
    """An output path that tlq will not write to; the message names the path, the reason and the fix."""


def _listing(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _files_below(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())


def foreign_files(path: Path) -> list[str]:
    """Files in directory ``path`` that tlq did not write: all of them without a marker, else those
    missing from the marker's list (a file the user added to an earlier output stays theirs)."""
    present = [f for f in _files_below(path) if f != MARKER]
    try:
        written = set(json.loads((path / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return present
    return [f for f in present if f not in written]


def _inside(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies below it (both resolved)."""
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_not_protected(out: Path, flag: str, protected: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output that is, or would contain, one of the run's inputs."""
    for what, p in protected:
        if _inside(p, out):
            relation = "is" if p.resolve() == out.resolve() else "contains"
            raise OutputError(f"{flag} {str(out)!r} {relation} the {what} ({str(p)!r}); choose an output path outside it")


def check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a writable directory (missing ones are created later)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail with a confusing error
            raise OutputError(f"{flag} {str(path)!r}: {str(parent)!r} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {str(path)!r}: directory {str(parent)!r} is not writable; choose another path")


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--out", protected: Iterable[tuple[str, Path]] = ()) -> Path:
    """Validate an output directory before any work starts (see the module docstring for the rules)."""
    out = Path(path)
    check_not_protected(out, flag, protected)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{flag} {str(out)!r} exists and is not a directory; choose a directory path")
    if out.is_dir():
        if not overwrite:
            raise OutputError(f"{flag} {str(out)!r} already exists; choose another path or pass --overwrite")
        foreign = foreign_files(out)
        if foreign:
            raise OutputError(
                f"{flag} {str(out)!r} holds files tlq did not write ({_listing(foreign)}); --overwrite only replaces "
                "earlier tlq outputs: choose another directory, or move those files"
            )
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {str(out)!r}: its directory {str(out.parent)!r} is not writable")
        return out
    check_parent(out, flag)
    return out


def check_output_file(path: str | Path, overwrite: bool, flag: str, protected: Iterable[tuple[str, Path]] = ()) -> Path:
    """Validate a single output file (a JSON report): never a directory, never an input."""
    out = Path(path)
    check_not_protected(out, flag, protected)
    if out.is_dir():
        raise OutputError(f"{flag} {str(out)!r} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise OutputError(f"{flag} {str(out)!r} already exists; choose another path or pass --overwrite")
    check_parent(out, flag)
    return out


def check_free_space(path: Path, need_bytes: int, flag: str = "--out") -> None:
    """Refuse when the filesystem of ``path`` has less room than the estimated output needs."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OutputError(
            f"{flag} {str(path)!r}: {free / 2**30:.2f} GiB free on its disk, the output needs about "
            f"{need_bytes / 2**30:.2f} GiB; free space or choose another disk"
        )


# --- staging and replacing ------------------------------------------------------------------------
def staging_dir(out: Path) -> Path:
    """A new owner-tagged hidden sibling of ``out`` to build the output in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{_STAGING}{process_tag()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_marker(directory: Path, kind: str) -> None:
    """Mark ``directory`` as tlq's own output, listing the files it holds now (what ``--overwrite`` may
    replace; anything added later is the user's)."""
    from tlq import __version__

    # no timestamp: the same run writes the same bytes (resumed and uninterrupted runs are compared so)
    info = {"written_by": "tlq", "version": __version__, "kind": kind, "files": _files_below(directory)}
    (directory / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def publish(tmp: Path, out: Path, kind: str) -> bool:
    """Mark the complete ``tmp`` and move it to ``out``; returns True if an earlier output was replaced.

    The earlier output is moved aside first and deleted only after the new one is in place, so a crash
    at any point leaves one complete output (the old or the new) under ``out``'s name or beside it.
    """
    write_marker(tmp, kind)
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return False
    foreign = foreign_files(out) if out.is_dir() else [out.name]
    if foreign:  # appeared while we calibrated
        raise OutputError(f"{str(out)!r} now holds files tlq did not write ({_listing(foreign)}); the new output is kept in {str(tmp)!r}")
    aside = out.parent / f".{out.name}.{_ASIDE}{process_tag()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return True


@contextmanager
def staged_output(out: Path, kind: str) -> Iterator[Path]:
    """``with staged_output(out, kind) as tmp:`` write everything into ``tmp``; on success it is marked
    and published as ``out`` (:func:`publish`), on an exception removed. If publishing itself is
    refused, the complete output stays in ``tmp``, as the error says."""
    tmp = staging_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, kind)


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove what killed runs left beside ``out``: staging and moved-aside dirs of dead owners (of this
    host), and the unowned ``.OUT.tmp-xxxxxxxx`` staging dirs of older tlq versions. Returns them."""
    removed = sweep_dead_owner_dirs(out.parent, f".{out.name}.{_STAGING}")
    removed += sweep_dead_owner_dirs(out.parent, f".{out.name}.{_ASIDE}")
    if out.parent.is_dir():
        for entry in out.parent.iterdir():
            m = _LEGACY_TMP.match(entry.name)
            if m and m.group("name") == out.name and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
