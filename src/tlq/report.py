"""The quantization report: what the run did, per layer, as a table on screen and as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from tlq.engine.layerwise import LayerReport, count_rtn_fallbacks


@dataclass
class QuantizeReport:
    model: str
    model_type: str
    scheme: str
    method: str
    output: str
    num_samples: int
    num_tokens: int
    device: str
    dtype: str
    layers: list[LayerReport] = field(default_factory=list)
    calibration_seconds: float = 0.0
    export_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1  # processes that shared the calibration (torchrun)
    peak_rss_mb_per_rank: list[float] = field(default_factory=list)  # each process's peak RSS (OS figure)
    token_set: dict[str, Any] | None = None  # token-level calibration set summary (TLQ / MBQ)
    streamed: bool = False  # decoder layers were loaded from disk one at a time (--stream)
    sequences: dict[str, int] | None = None  # max_seq_len (the cap used), longest_sample_tokens, truncated_samples
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (rank 0's), tlq.utils.timing

    @property
    def mean_rel_error(self) -> float:
        return sum(layer.rel_error for layer in self.layers) / max(len(self.layers), 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_rel_error"] = self.mean_rel_error
        return d


def render_summary(report: QuantizeReport, console: Console | None = None) -> None:
    """Print the per-layer table and the closing summary line."""
    console = console or Console(stderr=True)
    table = Table(title=f"TLQ {report.method} · {report.scheme} · {report.model}", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("linears", justify="right")
    table.add_column("rel. output error", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("peak mem (MiB)", justify="right")
    for layer in report.layers:
        table.add_row(
            str(layer.index),
            str(layer.num_linears),
            f"{layer.rel_error:.3e}",
            f"{layer.seconds:.2f}",
            f"{layer.peak_mem_mb:.0f}",
        )
    console.print(table)
    console.print(
        f"[bold]done[/bold]: {len(report.layers)} layers, {report.num_samples} samples "
        f"({report.num_tokens} tokens{_cut_note(report.sequences)}), mean rel. error {report.mean_rel_error:.3e}, "
        f"calibration {report.calibration_seconds:.1f}s, export {report.export_seconds:.1f}s, "
        f"peak RSS {report.peak_rss_mb:.0f} MiB{' (streamed)' if report.streamed else ''} -> {report.output}"
    )
    if fallback := _fallback_note(report):
        console.print(fallback)
    if report.phases:
        console.print("time by phase: " + ", ".join(f"{name} {sec:.1f}s" for name, sec in sorted(report.phases.items(), key=lambda kv: -kv[1])))


def _cut_note(seq: dict[str, int] | None) -> str:
    """What the length cap did, for the closing line (nothing when it cut nothing)."""
    if not seq or not seq.get("truncated_samples"):
        return ""
    return f"; {seq['truncated_samples']} cut to --max-seq-len {seq['max_seq_len']}"


def _fallback_note(report: QuantizeReport) -> str:
    """MoE: how many routed expert linears were quantized by RTN for lack of rows, and what gives them rows.
    With a token-level set an expert's statistics take only the kept tokens routed to it, unless
    --experts-every-row gives it all of them, so the remedy is more samples, or every routed row; the
    per-layer lists are in the JSON report (``rtn_fallback``)."""
    fallback = count_rtn_fallbacks(report.layers)
    if not fallback:
        return ""
    routed = sum(len(layer.routed_tokens) for layer in report.layers)
    gptq = report.config.get("gptq", {})
    thinned = (report.token_set is not None and report.token_set.get("union_share", 1.0) < 1.0  # the set dropped tokens
               and not report.config.get("selection", {}).get("experts_every_row", False))
    remedy = "more calibration samples" + (", or every routed row (--experts-every-row)," if thinned else "")
    return (f"MoE: {fallback} of {routed} routed expert linears saw fewer routed token rows than GPTQ's minimum "
            f"(--gptq-min-tokens {gptq.get('min_tokens')}, --gptq-min-tokens-in {gptq.get('min_tokens_in')} for gate/up) "
            f"and were quantized by RTN; {remedy} give them rows")
