"""From what size does a bf16 matmul beat float32 on this CPU? The evidence behind the scale search's
``BF16_MIN_WEIGHTS`` (``tlq.engine.smoothing``): linears under it keep float32 in a bf16 search loss.

    python benchmarks/bf16_matmul.py --out docs/bf16_matmul

Per (rows, in, out): the median seconds of ``linear(x, W)`` in float32 against what the search does in
bf16 (the input cast on the way in, the bf16 weight cast once beforehand, the output cast back to float32),
one torch thread, the two interleaved round by round so drift in the machine's speed hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from _report import command_line, write_report

SHAPES = ((128, 128), (128, 512), (256, 1024), (512, 2048), (896, 4864), (1536, 8960))  # (in, out); the last two: 0.5B and 2B MLPs


def seconds(fn: Callable[[], torch.Tensor], flops: float) -> float:
    """One timing of ``fn``, repeated to about 0.5 GFLOP so that small shapes are not all overhead."""
    reps = max(3, int(5e8 / flops))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(rows: int, k: int, m: int, rounds: int) -> dict:
    x, w = torch.randn(rows, k), torch.randn(m, k)
    wb = w.bfloat16()
    fp32 = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    bf16 = lambda: torch.nn.functional.linear(x.bfloat16(), wb).float()  # noqa: E731
    fp32(), bf16()
    flops = 2.0 * rows * k * m
    t32, t16 = [], []
    for _ in range(rounds):
        t32.append(seconds(fp32, flops))
        t16.append(seconds(bf16, flops))
    a, b = statistics.median(t32), statistics.median(t16)
    return {"rows": rows, "in": k, "out": m, "weights": k * m, "fp32_ms": a * 1e3, "bf16_ms": b * 1e3, "ratio": b / a}


def to_markdown(result: dict) -> list[str]:
    lines = ["# bf16 against float32 matmuls on this CPU", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Median of {result['rounds']} interleaved rounds per cell.", "",
             "| rows | in x out | weights | float32 ms | bf16 ms (with the casts) | bf16 / float32 |", "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['rows']} | {r['in']} x {r['out']} | {r['weights']:,} | {r['fp32_ms']:.3f} | {r['bf16_ms']:.3f} | {r['ratio']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="32,128,600", help="comma-separated token counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="docs/bf16_matmul")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"command": command_line("bf16_matmul.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}, "
                         f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}",
              "rounds": args.rounds, "rows": []}
    for rows in (int(r) for r in args.rows.split(",")):
        for k, m in SHAPES:
            result["rows"].append(measure(rows, k, m, args.rounds))
    write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
