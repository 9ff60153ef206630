"""The evaluation table printed by ``tlq eval``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_eval_table(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{result['model']} on {result['data']} ({result['num_samples']} samples)", title_justify="left")
    for col in ("model", "accuracy", "% of FP16", "answer NLL", "KL(FP16||q)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fp = result["fp16"]
    table.add_row("FP16", f"{100 * fp['accuracy']:.2f}%", "100.0%", f"{fp['nll']:.4f}", "-")
    for c in result["comparisons"]:
        table.add_row(c["name"], f"{100 * c['accuracy']:.2f}%", f"{c['retained_pct']:.1f}%", f"{c['nll']:.4f}", f"{c['kl']:.4f}")
    console.print(table)
