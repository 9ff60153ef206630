"""What every benchmark ends with: its JSON and Markdown written atomically side by side, the table shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlq.utils.io import atomic_write_json, atomic_write_text


def write_report(out: str | Path, result: dict[str, Any], markdown_lines: list[str]) -> None:
    """``OUT.json`` (the measurements) and ``OUT.md`` (the table for docs/), then print the table."""
    out = Path(out)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), "\n".join(markdown_lines) + "\n")
    print("\n".join(markdown_lines))
