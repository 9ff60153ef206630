"""What every benchmark ends with: its JSON and Markdown written atomically side by side, the table shown."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from tlq.utils.io import atomic_write_json, atomic_write_text


def write_report(out: str | Path, result: dict[str, Any], markdown_lines: list[str]) -> None:
    """``OUT.json`` (the measurements) and ``OUT.md`` (the table for docs/), then print the table.

    ``OUT`` is a name without suffix (a ``.json`` or ``.md`` one is dropped); a dot inside it stays, as in
    ``docs/cost-qwen3.5-0.8b``."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".json", ".md") else out
    atomic_write_json(base.parent / f"{base.name}.json", result)
    atomic_write_text(base.parent / f"{base.name}.md", "\n".join(markdown_lines) + "\n")
    print("\n".join(markdown_lines))


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run, quoted so that it can be pasted into a shell as written."""
    return f"python benchmarks/{script} " + shlex.join(argv if argv is not None else sys.argv[1:])
