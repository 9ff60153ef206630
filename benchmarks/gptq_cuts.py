"""What GPTQ's two exact cuts save at a released shape, in one process: the Hessian's upper half, and the
stream no step reads run for the report's error only.

    python benchmarks/gptq_cuts.py --shape llava-onevision-0.5b --num-samples 16 --out docs/gptq_cuts-llava-onevision-0.5b

* ``whole Gram``: each Hessian batch formed as the whole product ``X^T X`` and both streams run on every
  sample (how tlq worked before; ``calib.error_samples=0``);
* ``+ upper half``: the Hessian's blocks on and above the diagonal only, mirrored when read
  (``tlq.quant.gptq._add_gram_``);
* ``+ report stream``: plain GPTQ's FP stream (read by no step, only by the report's error) on the first
  ``calib.error_samples`` samples (8, the default).

One process calibrates the same checkpoint (random weights at the released widths, depth and vision tower
cut) under each setting in turn, round after round; it reports the process's CPU seconds per setting (one
torch thread), the ratio to the first setting per round, and whether the codes equal the first's (they must:
both cuts change no number a decision reads).
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
from tlq.api import build_config, calibrate
from tlq.quant import gptq

SETTINGS = ("whole Gram", "+ upper half", "+ report stream")


@contextlib.contextmanager
def setting(name: str) -> Iterator[None]:
    """``whole Gram`` puts the whole product back into the Hessian accumulator (no mirroring needed)."""
    saved = gptq._add_gram_, gptq._mirror_upper_
    if name == "whole Gram":
        gptq._add_gram_ = lambda total, a: gptq._add_product_(total, a, a)
        gptq._mirror_upper_ = lambda total: None
    try:
        yield
    finally:
        gptq._add_gram_, gptq._mirror_upper_ = saved


def run_once(model: Path, calib: Path, name: str, args: argparse.Namespace) -> dict:
    cfg = build_config(args.scheme, "gptq", num_samples=args.num_samples, device="cpu",
                       error_samples=args.error_samples if name == "+ report stream" else 0)
    t0 = time.process_time()
    with setting(name):
        run = calibrate(model, calib, cfg, progress=False)
    return {"setting": name, "process_seconds": time.process_time() - t0, "phases": dict(run.clock.seconds), "num_tokens": run.num_tokens,
            "_codes": {k: q.codes for k, q in run.result.quantized.items()}}


def summarize(runs: list[dict]) -> list[dict]:
    first = [r for r in runs if r["setting"] == SETTINGS[0]]
    rows = []
    for name in SETTINGS:
        mine = [r for r in runs if r["setting"] == name]
        if not mine:
            continue
        ratios = [m["process_seconds"] / f["process_seconds"] for f, m in zip(first, mine)]
        rows.append({"setting": name, "process_seconds": statistics.median(r["process_seconds"] for r in mine), "ratios": ratios,
                     "median_ratio": statistics.median(ratios), "codes_differing": max(r["codes_differing"] for r in mine),
                     "phases": {k: statistics.median(r["phases"].get(k, 0.0) for r in mine) for k in mine[0]["phases"]}})
    return rows


def to_markdown(result: dict) -> list[str]:
    lines = ["# GPTQ's exact cuts: the Hessian's upper half, the report-only stream", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Checkpoint: {result['shape']} widths (random weights), {result['layers']} decoder "
             f"layer(s), vision tower cut to {result['vision_depth']} block(s); {result['num_samples']} sample(s) of "
             f"{result['image_px']} px ({result.get('num_tokens', '?')} tokens); tlq GPTQ at {result['scheme']}; {result['rounds']} rounds, "
             "each setting once per round, in one process; CPU seconds of the whole calibration (one torch thread).", "",
             "| setting | median CPU s | per-round ratio to the first (median) | statistics + solve s | FP stream s | codes differing |",
             "|---|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
        ph = r["phases"]
        lines.append(f"| {r['setting']} | {r['process_seconds']:.1f} | {ratios} ({r['median_ratio']:.2f}) | "
                     f"{ph.get('statistics + solve (GPTQ/RTN, FP target)', 0.0):.1f} | {ph.get('FP stream', 0.0):.1f} | {r['codes_differing']:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llava-onevision-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vision-depth", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--error-samples", type=int, default=8)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default=None, help="where the checkpoint is built (default: a temporary folder)")
    p.add_argument("--out", default="docs/gptq_cuts")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, calib = cut_inputs(args, "tlq-gptqcuts-")
    result = {"command": command_line("gptq_cuts.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "shape": args.shape, "layers": args.layers, "vision_depth": args.vision_depth, "num_samples": args.num_samples,
              "image_px": args.image_px, "scheme": args.scheme, "rounds": args.rounds, "runs": [], "rows": []}
    ref = None
    for _round in range(args.rounds):
        for name in SETTINGS:
            run = run_once(model, calib, name, args)
            codes = run.pop("_codes")
            ref = codes if ref is None else ref
            run["codes_differing"] = sum(int((codes[k] != ref[k]).sum()) for k in ref)
            result["runs"].append(run)
            result["num_tokens"] = run["num_tokens"]
            result["rows"] = summarize(result["runs"])
            print({k: v for k, v in run.items() if k != "phases"}, flush=True)
            write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
