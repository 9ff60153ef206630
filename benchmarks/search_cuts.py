"""What the scale search's exact shortcuts save at a released shape, measured in one process.

    python benchmarks/search_cuts.py --shape llava-onevision-0.5b --image-px 448 --out docs/search_cuts-llava-ov-0.5b

A scale candidate judged on the whole decoder layer weighs each token's output row by its token weight;
with the token-level calibration set half the rows weigh nothing. The search then computes attention
queries only at the kept rows (``tlq.engine.rows.QueryRows``; keys and values for every token), and
fake-quantizes each candidate's weights without forming integer codes (``rtn_fake_quantize``). Both
give bit-identical losses, so the chosen exponents and codes must not change; what they save depends on
the sequence length (attention grows with it) and the widths.

One process calibrates the same checkpoint (random weights at the released widths, depth cut to
``--layers``, vision tower to ``--vision-depth``) with TLQ (RTN solver: the solve is not what is timed)
under each setting in turn, round after round (``--rounds``), so drift in the machine's speed hits every
setting alike; it reports each setting's median scale-search CPU seconds (and wall), the ratio to the first
setting's (``--settings``; ``before`` by default) per round, and whether the exponents and codes equal the first's.
The exact shortcuts must give the same exponents and codes; bf16 matmuls (``--search-dtype bfloat16``) need not,
nor one record pass per layer (``--search-record layer``: later mappings recorded before the earlier folds,
equal up to float rounding; every other setting records mapping by mapping).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from tlq.api import build_config, calibrate
from tlq.engine import smoothing
from tlq.quant.rtn import rtn_quantize

SETTINGS = ("before", "query cut", "query cut + codes-free RTN", "+ bf16 matmuls", "+ bf16 blocks", "+ one record pass")
BF16 = ("+ bf16 matmuls", "+ bf16 blocks", "+ one record pass")


@contextlib.contextmanager
def setting(name: str) -> Iterator[None]:
    """``before``: queries at every row and RTN through integer codes (the search as it was); the others
    switch the shortcuts on one after the other (bf16 matmuls is a config option, see run_once; bf16 blocks
    adds the MLP computed in bf16 between its linears, which the bf16 matmuls setting turns off)."""
    saved = smoothing.query_cut, smoothing.rtn_fake_quantize, smoothing._low_precision_blocks
    if name == "+ bf16 matmuls":
        smoothing._low_precision_blocks = lambda *_a: []
    if name == "before":
        smoothing.query_cut = lambda attn, rows: None
    if name in ("before", "query cut"):
        smoothing.rtn_fake_quantize = lambda w, spec, scale_dtype=None: rtn_quantize(w, spec, scale_dtype).dequantize(w.dtype)
    try:
        yield
    finally:
        smoothing.query_cut, smoothing.rtn_fake_quantize, smoothing._low_precision_blocks = saved


@contextlib.contextmanager
def cpu_clock(owner: object, name: str, spent: list[float]) -> Iterator[None]:
    """Add the process CPU seconds of every call of ``owner.name`` (a module's function) to ``spent``: on a
    machine whose other core is busy, CPU time moves far less than wall time (one torch thread: the
    process's CPU time is the function's)."""
    fn = getattr(owner, name)

    def timed(*a, **kw):
        t0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            spent.append(time.process_time() - t0)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def run_once(model: Path, calib: Path, name: str, args: argparse.Namespace) -> dict:
    cfg = build_config(args.scheme, "tlq", solver="rtn", num_samples=args.num_samples, device="cpu",
                       search_dtype="bfloat16" if name in BF16 else "compute", search_record="layer" if name == "+ one record pass" else "mapping")
    spent: list[float] = []
    with setting(name), cpu_clock(smoothing, "search_layer_scales", spent):
        run = calibrate(model, calib, cfg, progress=False)
    return {"setting": name, "search_seconds": sum(spent), "search_wall_seconds": run.clock.seconds["scale search"], "num_tokens": run.num_tokens,
            "alphas": [la.search_alphas for la in run.result.layers], "_codes": {k: q.codes for k, q in run.result.quantized.items()}}


def summarize(runs: list[dict], settings: list[str]) -> list[dict]:
    """Per setting: its medians and its ratio, round by round, to the first setting's."""
    rows = []
    for name in settings:
        mine = [r for r in runs if r["setting"] == name]
        if not mine:
            continue
        ratios = [m["search_seconds"] / b["search_seconds"] for m, b in zip(mine, [r for r in runs if r["setting"] == settings[0]])]
        rows.append({"setting": name, "search_seconds": [m["search_seconds"] for m in mine],
                     "median_wall_seconds": statistics.median(m["search_wall_seconds"] for m in mine),
                     "median_seconds": statistics.median(m["search_seconds"] for m in mine),
                     "ratio_to_before": ratios, "median_ratio": statistics.median(ratios) if ratios else None,
                     "same_alphas": all(m["same_alphas"] for m in mine), "codes_differing": max(m["codes_differing"] for m in mine)})
    return rows


def to_markdown(result: dict) -> list[str]:
    lines = ["# Scale search: what the shortcuts save", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Checkpoint: {result['shape']} widths (random weights), {result['layers']} decoder "
             f"layer(s), vision tower cut to {result['vision_depth']} block(s); {result['num_samples']} sample(s) of "
             f"{result['image_px']} px ({result['num_tokens']} tokens); TLQ at {result['scheme']} with the RTN solver; "
             f"{result['rounds']} rounds, each setting once per round, in one process.", "",
             "Seconds are the scale search's CPU time (one torch thread), which other work on the machine moves far less "
             "than wall time; the median wall time is beside it.", "",
             f"| setting | scale search, median CPU s | median wall s | per-round CPU ratio to `{result['settings'][0]}` (median) | exponents as `{result['settings'][0]}` | codes differing |",
             "|---|---:|---:|---|---|---:|"]
    for r in result["rows"]:
        ratios = ", ".join(f"{x:.2f}" for x in r["ratio_to_before"])
        lines.append(f"| {r['setting']} | {r['median_seconds']:.1f} | {r['median_wall_seconds']:.1f} | {ratios} ({r['median_ratio']:.2f}) | "
                     f"{'yes' if r['same_alphas'] else 'no'} | {r['codes_differing']:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llava-onevision-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-depth", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS) + " (ratios are to the first)")
    p.add_argument("--work", default=None, help="where the checkpoint is built (default: a temporary folder)")
    p.add_argument("--out", default="docs/search_cuts")
    args = p.parse_args(argv)
    model, calib = cut_inputs(args, "tlq-searchcuts-")
    result = {"command": command_line("search_cuts.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "shape": args.shape, "layers": args.layers, "vision_depth": args.vision_depth, "num_samples": args.num_samples,
              "image_px": args.image_px, "scheme": args.scheme, "rounds": args.rounds, "settings": args.settings.split(","), "runs": [], "rows": []}
    ref: dict | None = None
    for _round in range(args.rounds):
        for name in args.settings.split(","):
            run = run_once(model, calib, name, args)
            codes = run.pop("_codes")
            if ref is None:
                ref = {"alphas": run["alphas"], "codes": codes}
            run["same_alphas"] = repr(run["alphas"]) == repr(ref["alphas"])
            run["codes_differing"] = sum(int((codes[k] != ref["codes"][k]).sum()) for k in ref["codes"])
            result["runs"].append(run)
            result["num_tokens"] = run["num_tokens"]
            result["rows"] = summarize(result["runs"], result["settings"])
            print(json.dumps({k: v for k, v in run.items() if k != "alphas"}), flush=True)
            write_report(args.out, result, to_markdown(result))  # after every run
    return 0


if __name__ == "__main__":
    sys.exit(main())
