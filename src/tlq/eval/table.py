"""The evaluation table printed by ``tlq eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _short(path: str) -> str:
    """The last path component: full paths are in the JSON report, the table must stay readable."""
    return Path(str(path).rstrip("/")).name or str(path)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _flips(f: dict[str, Any] | None) -> str:
    """Share of changed answers, then how many went right -> wrong and wrong -> right."""
    return "-" if f is None else f"{100 * f['share']:.1f}% (-{f['lost']}/+{f['gained']})"


def render_eval_table(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    title = f"{_short(result['model'])} on {_short(result['data'])} ({result['num_samples']} samples)"
    table = Table(title=title, title_justify="left")
    for col in ("model", "accuracy", "% of FP16", "flips vs FP16", "answer NLL", "KL(FP16||q)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fp = result["fp16"]
    table.add_row("FP16", f"{100 * fp['accuracy']:.2f}%", "100.0%", "-", f"{fp['nll']:.4f}", "-")
    for c in result["comparisons"]:
        table.add_row(_short(c["name"]), f"{100 * c['accuracy']:.2f}%", _pct(c["retained_pct"]), _flips(c.get("flips")),
                      f"{c['nll']:.4f}", f"{c['kl']:.4f}")
    console.print(table)
    for t in result.get("paired", []):
        first, second = _short(t["first"]), _short(t["second"])
        console.print(
            f"paired (McNemar, same samples): {first} right where {second} is wrong on {t['wins']}, "
            f"the reverse on {t['losses']}; p = {t['p']:.3g}"
        )
        if t.get("keeps_fp16"):
            k = t["keeps_fp16"]
            console.print(f"  keeps FP16's right/wrong answer: only {first} on {k['wins']}, only {second} on {k['losses']}; p = {k['p']:.3g}")
