"""Per-rank peak memory against the number of processes (gloo on CPU), measured from the OS.

    python benchmarks/distributed_memory.py                 # writes docs/distributed_memory.{md,json}

Builds a small, wide random Qwen2-VL checkpoint and a calibration set large enough that the calibration
activations (which sharding divides) dominate the per-process memory, then runs
``tlq quantize --nproc N`` for each N and reads every rank's peak RSS (``ru_maxrss``) from the report.
In memory (the default) the model itself is replicated on every rank, so the saving is the
activations' share; with ``--stream`` every rank holds one decoder layer at a time, so what is left per
rank is mostly its shard of the activations (and the import floor of torch + transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlq.models.tiny import make_tiny_vlm

from _report import command_line, write_report


def make_calib(root: Path, n: int, size: int) -> Path:
    """``n`` samples over 8 distinct noise images (``size`` px square) with long questions."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    lines = [
        json.dumps({"image": f"img/{i % 8}.png", "question": "Describe every detail of the picture. " * 4, "answer": "noise " * 8})
        for i in range(n)
    ]
    path = root / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=224, help="224 px -> 64 visual tokens per sample")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic model")
    p.add_argument("--stream", action="store_true", help="run tlq quantize --stream (one decoder layer in memory per rank)")
    p.add_argument("--out", default="docs/distributed_memory")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlq-distmem-") as tmp:
        root = Path(tmp)
        model = make_tiny_vlm("qwen2_vl", root / "model", num_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_heads=8, num_kv_heads=8, image_size=args.image_size)
        calib = make_calib(root / "data", args.samples, args.image_size)
        for n in [int(x) for x in args.nprocs.split(",")]:
            report = root / f"report{n}.json"
            cmd = [sys.executable, "-m", "tlq", "quantize", "--model", str(model), "--calib", str(calib), "--out", str(root / f"out{n}"),
                   "--scheme", "w4a16", "--method", "gptq", "--num-samples", str(args.samples), "--nproc", str(n),
                   "--no-resume", "--quiet", "--report", str(report)] + (["--stream"] if args.stream else [])
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rep = json.loads(report.read_text())
            rows.append({"nproc": n, "peak_rss_mb_per_rank": rep["peak_rss_mb_per_rank"], "seconds": time.perf_counter() - t0,
                         "num_tokens": rep["num_tokens"]})
            print(rows[-1], flush=True)
    result = {"command": command_line("distributed_memory.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "hidden": args.hidden, "layers": args.layers,
              "samples": args.samples, "stream": args.stream, "rows": rows}
    base = max(rows[0]["peak_rss_mb_per_rank"])
    md = ["# Per-rank peak memory against the number of processes", "",
          f"Command: `{result['command']}` on {result['machine']}. Qwen2-VL architecture, hidden {args.hidden}, {args.layers} layers, "
          f"{args.samples} calibration samples ({rows[0]['num_tokens']} tokens), W4A16 GPTQ, gloo, "
          + ("decoder layers streamed from disk (`--stream`). " if args.stream else "model in memory on every rank. ")
          + "Peak RSS from the OS (`ru_maxrss`) per rank.", "",
          "| processes | peak RSS per rank (MiB) | max vs 1 process | wall time (s) |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['nproc']} | {', '.join(f'{m:.0f}' for m in r['peak_rss_mb_per_rank'])} | "
                  f"{max(r['peak_rss_mb_per_rank']) / base:.2f} | {r['seconds']:.0f} |")
    write_report(args.out, result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
