"""Time of the scale search per decoder layer, by what a candidate's loss runs on, in one run.

    python benchmarks/search_speed.py            # writes docs/search_speed.{md,json}

On a synthetic Qwen2-VL checkpoint with a hidden-2048 decoder (``streaming_memory.write_deep_checkpoint``:
intermediate 5632, 16 heads, 2 KV heads, random weights), one process calibrates the same layers with
the same samples three times:

* ``whole layer``: every candidate of every mapping runs the whole decoder layer (what the engine did
  before the block mechanism; forced here by making every mapping's loss module the layer itself);
* ``layer`` (the default scope): the same objective, but the MLP mappings, whose block output is added
  unchanged to the layer output, run the MLP (gate/up) or down_proj alone;
* ``block``: AWQ's own loss, the output of the mapping's block (attention for q/k/v, the MLP for
  gate/up, the linear itself for o_proj and down_proj).

It reports the engine's seconds per layer and, against ``whole layer``, the ratio and how many integer
codes differ (``layer`` computes the same losses, so its codes should match; ``block`` optimises a
different loss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _report import command_line, write_report
from streaming_memory import add_checkpoint_args, write_deep_checkpoint
from tlq.api import build_config, calibrate
from tlq.builtin import resolve_model_dir
from tlq.engine import smoothing

SETTINGS = ("whole layer", "layer", "block")


def run_setting(model: Path, setting: str, args: argparse.Namespace) -> dict:
    scope = "layer" if setting == "whole layer" else setting
    cfg = build_config(args.scheme, args.method, num_samples=args.num_samples, search_grid=args.search_grid, search_scope=scope, device="cpu")
    original = smoothing.loss_module
    if setting == "whole layer":
        smoothing.loss_module = lambda config, mapping: ""  # every candidate through the whole layer
    try:
        t0 = time.perf_counter()
        run = calibrate(model, resolve_model_dir("builtin:digits-qwen2vl") / "calib.jsonl", cfg, progress=False)
        total = time.perf_counter() - t0
    finally:
        smoothing.loss_module = original
    layers = run.result.layers
    codes = {name: qw.codes for name, qw in run.result.quantized.items()}
    return {"setting": setting, "seconds_total": total, "seconds_per_layer": sum(la.seconds for la in layers) / len(layers),
            "search_alphas": [la.search_alphas for la in layers], "max_layer_rel_error": max(la.rel_error for la in layers),
            "num_tokens": run.num_tokens, "_codes": codes}


def to_markdown(result: dict) -> list[str]:
    rows = result["rows"]
    ref = next((r for r in rows if r["setting"] == "whole layer"), None)
    lines = ["# Scale search: time per decoder layer by loss scope", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Synthetic Qwen2-VL checkpoint, hidden {result['hidden']}, intermediate "
             f"{result['intermediate']}, {result['layers']} layer(s); `{result['method']}` at {result['scheme']}, "
             f"{result['num_samples']} calibration samples ({rows[0]['num_tokens'] if rows else 0} tokens), search grid "
             f"{result['search_grid']}, float32 on CPU. All rows in one process, one after the other.", "",
             *([f"Note: {result['note']}", ""] if result.get("note") else []),
             "| loss runs on | seconds per layer | speed-up vs whole layer | codes differing from whole layer | max layer rel. error |",
             "|---|---|---|---|---|"]
    for r in rows:
        speed = f"{ref['seconds_per_layer'] / r['seconds_per_layer']:.2f}x" if ref else "-"
        diff = f"{r['codes_differing']:,} of {r['codes_total']:,}" if "codes_differing" in r else "-"
        lines.append(f"| {r['setting']} | {r['seconds_per_layer']:.1f} | {speed} | {diff} | {r['max_layer_rel_error']:.3e} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--method", default="tlq")
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--search-grid", type=int, default=20)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--out", default="docs/search_speed")
    p.add_argument("--render", metavar="JSON", default=None, help="only rewrite JSON's Markdown next to it (e.g. after adding a note)")
    args = p.parse_args(argv)
    if args.render:
        report = Path(args.render)
        write_report(report.with_suffix(""), json.loads(report.read_text()), to_markdown(json.loads(report.read_text())))
        return 0
    settings = [s.strip() for s in args.settings.split(",")]
    if any(s not in SETTINGS for s in settings):
        p.error(f"--settings takes {', '.join(SETTINGS)}")
    work = Path(tempfile.mkdtemp(prefix="tlq-searchspeed-"))
    result = {"command": command_line("search_speed.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "method": args.method,
              "scheme": args.scheme, "num_samples": args.num_samples, "search_grid": args.search_grid, "rows": []}
    try:
        model = work / "deep-qwen2vl"
        write_deep_checkpoint(model, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads)
        ref_codes = None
        for setting in settings:
            row = run_setting(model, setting, args)
            codes = row.pop("_codes")
            if setting == "whole layer":
                ref_codes = codes
            elif ref_codes is not None:
                row["codes_differing"] = sum(int((codes[k] != ref_codes[k]).sum()) for k in ref_codes)
                row["codes_total"] = sum(c.numel() for c in ref_codes.values())
            result["rows"].append(row)
            print({k: v for k, v in row.items() if k != "search_alphas"}, flush=True)
            write_report(args.out, result, to_markdown(result))  # after every row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
