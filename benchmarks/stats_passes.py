"""What stopping each statistics pass after its group's linears saves, at a released shape, in one process.

    python benchmarks/stats_passes.py --shape qwen2-vl-2b --image-px 448 --num-samples 4 --out docs/stats_passes

GPTQ's statistics of a linear group need the inputs of the group's linears, not the rest of the decoder
layer; ``tlq.engine.solve._PartialForward`` stops the layer's forward (and the FP target's reference
copy's) once they have all been called. One process calibrates the same checkpoint (random weights at the
released widths, depth and vision tower cut) with each method, whole forwards against partial ones,
round after round, and reports the CPU seconds of the statistics passes (``tlq.engine.solve._observe``),
the ratio per round, and whether the codes are bit-identical (they must be).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from _report import command_line, write_report
from cost import SHAPES, cut_inputs
from search_cuts import cpu_clock
from tlq.api import build_config, calibrate
from tlq.engine import solve
from tlq.models.base import run_layer

SETTINGS = ("whole", "partial")


@contextlib.contextmanager
def setting(name: str, spent: list[float]) -> Iterator[None]:
    """``whole``: every statistics pass runs the whole layer (as before); ``partial``: the engine's own.
    Either way the CPU seconds of each pass are added to ``spent``."""
    partial_run = solve._PartialForward.run
    if name == "whole":
        solve._PartialForward.run = lambda self, layer, x, kw: run_layer(layer, x, kw)
    try:
        with cpu_clock(solve, "_observe", spent):
            yield
    finally:
        solve._PartialForward.run = partial_run


def run_once(model: Path, calib: Path, method: str, name: str, args: argparse.Namespace) -> dict:
    cfg = build_config(args.scheme, method, num_samples=args.num_samples, device="cpu")
    spent: list[float] = []
    t0 = time.process_time()
    with setting(name, spent):
        run = calibrate(model, calib, cfg, progress=False)
    return {"method": method, "setting": name, "stats_seconds": sum(spent), "process_seconds": time.process_time() - t0,
            "_codes": {k: q.codes for k, q in run.result.quantized.items()}}


def summarize(runs: list[dict], method: str) -> dict:
    whole = [r for r in runs if r["method"] == method and r["setting"] == "whole"]
    part = [r for r in runs if r["method"] == method and r["setting"] == "partial"]
    ratios = [p["stats_seconds"] / w["stats_seconds"] for w, p in zip(whole, part)]
    return {"method": method, "whole_seconds": statistics.median(r["stats_seconds"] for r in whole),
            "partial_seconds": statistics.median(r["stats_seconds"] for r in part) if part else None,
            "whole_process_seconds": statistics.median(r["process_seconds"] for r in whole),
            "partial_process_seconds": statistics.median(r["process_seconds"] for r in part) if part else None,
            "ratios": ratios, "median_ratio": statistics.median(ratios) if ratios else None,
            "codes_differing": max((r["codes_differing"] for r in part), default=None)}


def to_markdown(result: dict) -> list[str]:
    lines = ["# Statistics passes stopped after their group's linears", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Checkpoint: {result['shape']} widths (random weights), {result['layers']} decoder "
             f"layer(s), vision tower cut to {result['vision_depth']} block(s); {result['num_samples']} sample(s) of "
             f"{result['image_px']} px; {result['scheme']}; {result['rounds']} rounds, whole then partial, in one process. "
             "CPU seconds (one torch thread).", "",
             "| method | statistics passes, whole (median CPU s) | partial | per-round ratio (median) | whole process, whole -> partial (CPU s) | codes differing |",
             "|---|---:|---:|---|---|---:|"]
    for r in result["rows"]:
        if r["partial_seconds"] is None:
            continue
        ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['method']} | {r['whole_seconds']:.1f} | {r['partial_seconds']:.1f} | {ratios} ({r['median_ratio']:.2f}) | "
                     f"{r['whole_process_seconds']:.1f} -> {r['partial_process_seconds']:.1f} | {r['codes_differing']:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2-vl-2b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-depth", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--methods", default="gptq,tlq")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default=None, help="where the checkpoint is built (default: a temporary folder)")
    p.add_argument("--out", default="docs/stats_passes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, calib = cut_inputs(args, "tlq-stats-")
    methods = args.methods.split(",")
    result = {"command": command_line("stats_passes.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "shape": args.shape, "layers": args.layers, "vision_depth": args.vision_depth, "num_samples": args.num_samples,
              "image_px": args.image_px, "scheme": args.scheme, "rounds": args.rounds, "runs": [], "rows": []}
    for _round in range(args.rounds):
        for method in methods:
            ref = None
            for name in SETTINGS:
                run = run_once(model, calib, method, name, args)
                codes = run.pop("_codes")
                ref = codes if ref is None else ref
                run["codes_differing"] = sum(int((codes[k] != ref[k]).sum()) for k in ref)
                result["runs"].append(run)
                result["rows"] = [summarize(result["runs"], m) for m in methods if any(r["method"] == m for r in result["runs"])]
                print(run, flush=True)
                write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
