"""Does a cheaper scale search pick the exponents the exact, full-grid one picks? In one run, per built-in
model, scheme and method: the chosen exponent of every mapping of every layer, the integer codes that
differ, and the scale-search seconds, the default search against one option changed (``--option``):
coarse-to-fine (``search_coarse=3``; TLQ's preset since run 10, so ``--base search_coarse=1`` compares it with the
full grid) or bf16 candidate forwards (``search_dtype=bfloat16``).

    python benchmarks/search_coarse.py --models digits-qwen2vl,digits-llavaov,needle-qwen2vl --out docs/search_coarse
    python benchmarks/search_coarse.py --option search_dtype=bfloat16 --out docs/search_bf16

Accuracy and KL on the val split come from benchmarks/accuracy.py (variants "TLQ coarse 3", "AWQ coarse 3",
"TLQ search bf16", "AWQ search bf16").
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from typing import Any

import torch

from _report import command_line, write_report
from tlq.api import build_config, calibrate
from tlq.config import OPTION_NAMES
from tlq.engine import smoothing
from tlq.builtin import builtin_set, resolve_model_dir


def run(model: str, scheme: str, method: str, options: dict[str, Any], num_samples: int) -> dict[str, Any]:
    """One in-memory calibration of ``model`` on its own calibration set."""
    cfg = build_config(scheme, method, num_samples=num_samples, device="cpu", **options)
    name = f"builtin:{model}"
    out = calibrate(name, builtin_set(resolve_model_dir(name), "calib"), cfg, progress=False)
    return {"alphas": [la.search_alphas for la in out.result.layers], "seconds": out.clock.seconds.get("scale search", 0.0),
            "codes": {k: qw.codes for k, qw in out.result.quantized.items()}}


def compare(full: dict[str, Any], fine: dict[str, Any]) -> dict[str, Any]:
    pairs = [(a, lb.get(k, math.nan)) for la, lb in zip(full["alphas"], fine["alphas"]) for k, a in la.items()]
    same = sum(1 for a, b in pairs if a == b or (math.isnan(a) and math.isnan(b)))
    return {"mappings": len(pairs), "same_exponent": same,
            "codes_differing": sum(int((fine["codes"][k] != c).sum()) for k, c in full["codes"].items()),
            "codes_total": sum(c.numel() for c in full["codes"].values()),
            "search_seconds_full": full["seconds"], "search_seconds_coarse": fine["seconds"]}


def to_markdown(result: dict[str, Any]) -> list[str]:
    name, value = result["option"]
    ref = "the default search" if not result.get("base") else "`--{} {}`".format(result["base"][0].replace("_", "-"), result["base"][1])
    lines = [f"# Scale search with `{name}={value}`: same exponents as {ref}?", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Each built-in model calibrated in memory on its own calibration set "
             f"({result['num_samples']} samples), grid 20, {ref} against `--{name.replace('_', '-')} {value}`, one after the other.", "",
             "| model | scheme | method | mappings with the same exponent | codes differing | scale search s (reference -> changed) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = r["search_seconds_coarse"] / r["search_seconds_full"] if r["search_seconds_full"] else float("nan")
        lines.append(f"| {r['model']} | {r['scheme']} | {r['method']} | {r['same_exponent']} of {r['mappings']} | "
                     f"{r['codes_differing']:,} of {r['codes_total']:,} | {r['search_seconds_full']:.1f} -> {r['search_seconds_coarse']:.1f} | {ratio:.2f} |")
    return lines


def parse_option(text: str) -> tuple[str, Any]:
    """``search_coarse=3`` -> ("search_coarse", 3): integers as integers, anything else as typed."""
    name, sep, value = text.partition("=")
    if not sep or name not in OPTION_NAMES:
        raise SystemExit(f"--option wants NAME=VALUE with NAME one of tlq.config.OPTIONS, got {text!r}")
    return name, int(value) if value.lstrip("-").isdigit() else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-qwen2vl,digits-llavaov,needle-qwen2vl")
    p.add_argument("--schemes", default="w3a16,w4a8")
    p.add_argument("--methods", default="tlq,awq")
    p.add_argument("--option", default="search_coarse=3", help="NAME=VALUE: the build_config option the changed search sets")
    p.add_argument("--base", default=None, help="NAME=VALUE: the option the reference search sets (default: the method's preset), "
                   "e.g. search_coarse=1 now that TLQ's preset is coarse-to-fine")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--out", default="docs/search_coarse")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = {"command": command_line("search_coarse.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "option": parse_option(args.option), "base": parse_option(args.base) if args.base else None,
              "num_samples": args.num_samples, "rows": []}
    changed = dict([result["option"]])
    base = dict([result["base"]]) if result["base"] else {}
    if changed.get("search_dtype") == "bfloat16":  # the built-ins' linears are all under the bf16 size floor: lowered, so bf16 is measured at all
        smoothing.BF16_MIN_WEIGHTS = 0
    for model in args.models.split(","):
        for scheme in args.schemes.split(","):
            for method in args.methods.split(","):
                full = run(model, scheme, method, base, args.num_samples)
                fine = run(model, scheme, method, changed, args.num_samples)
                row = {"model": model, "scheme": scheme, "method": method, **compare(full, fine)}
                result["rows"].append(row)
                print(row, flush=True)
                write_report(args.out, result, to_markdown(result))  # after every row
    return 0


if __name__ == "__main__":
    sys.exit(main())
