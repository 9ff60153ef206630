"""What bf16 matmuls save in the importance pass at a released shape, and how far they move it.

    python benchmarks/importance_dtype.py --shape llava-onevision-0.5b --layers 2 --image-px 448 --out docs/importance_dtype-llava-onevision-0.5b

One process loads a random-weight checkpoint with the released widths (depth cut to ``--layers``, vision
tower to ``--vision-depth``) and runs TLQ's importance pass (per-linear gradients, ``grad_at="linear"``)
on the same samples with each matmul dtype in turn, round after round, so drift in the machine's speed
hits both alike. It reports the pass's median CPU seconds (one torch thread: the process's CPU time is
the pass's), the per-round ratio to float32, and how close the bf16 gradients are: per layer and row,
the cosine of the token-gradient vectors and the share of the top-half tokens (the token-level set's
budget) both dtypes pick. The vision tower and layer-0 capture run once, outside the timed pass, as in
a calibration.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from _report import command_line, write_report
from cost import SHAPES, cut_inputs
from tlq.api import load_model
from tlq.data.calibration import load_calibration
from tlq.importance.gradients import token_gradients

DTYPES = ("compute", "bfloat16")


def closeness(exact: list[torch.Tensor], low: list[torch.Tensor]) -> dict[str, float]:
    """Over samples, layers and rows: the smallest cosine of the token-gradient vectors, and the smallest
    share of the top-half tokens that both pick."""
    cosines, overlaps = [], []
    for e, b in zip(exact, low):
        e, b = e.flatten(0, -2), b.flatten(0, -2)  # [rows, seq]
        cosines.append(torch.nn.functional.cosine_similarity(e, b, dim=1))
        k = max(1, e.shape[-1] // 2)
        for re, rb in zip(e, b):
            if re.sum() > 0:
                top_e, top_b = set(re.topk(k).indices.tolist()), set(rb.topk(k).indices.tolist())
                overlaps.append(len(top_e & top_b) / k)
    return {"min_cosine": float(torch.cat(cosines).min()), "min_top_half_overlap": min(overlaps), "median_top_half_overlap": statistics.median(overlaps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llava-onevision-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-depth", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=None, help="where the checkpoint is built (default: a temporary folder)")
    p.add_argument("--out", default="docs/importance_dtype")
    args = p.parse_args(argv)
    model_dir, calib = cut_inputs(args, "tlq-impdtype-")
    adapter, model, processor, _d, dev, _dt = load_model(model_dir, device="cpu")
    samples = load_calibration(calib, processor, adapter, model, num_samples=args.num_samples, max_seq_len=1 << 16, seed=0)
    layer0 = [adapter.capture_layer0_inputs(model, s.inputs) for s in samples]
    seconds: dict[str, list[float]] = {d: [] for d in DTYPES}
    grads: dict[str, list[torch.Tensor]] = {}
    for _round in range(args.rounds):
        for dtype in DTYPES:
            t0 = time.process_time()
            got = token_gradients(adapter, model, samples, at="linear", layer0=layer0, matmul_dtype=dtype)
            seconds[dtype].append(time.process_time() - t0)
            grads[dtype] = [g.grad for g in got]
            print(f"round {_round}: {dtype} {seconds[dtype][-1]:.1f} s", flush=True)
    ratios = [b / c for b, c in zip(seconds["bfloat16"], seconds["compute"])]
    result = {"command": command_line("importance_dtype.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "shape": args.shape, "layers": args.layers, "vision_depth": args.vision_depth, "num_samples": args.num_samples, "image_px": args.image_px,
              "num_tokens": sum(s.seq_len for s in samples), "seconds": seconds, "ratios": ratios, **closeness(grads["compute"], grads["bfloat16"])}
    lines = ["# The importance pass with bf16 matmuls", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Checkpoint: {args.shape} widths (random weights), {args.layers} decoder layer(s); "
             f"{args.num_samples} sample(s) of {args.image_px} px ({result['num_tokens']:,} tokens); per-linear gradients "
             f"(TLQ's `grad_at=\"linear\"`); {args.rounds} rounds, both dtypes once per round, in one process (CPU seconds, one torch thread).", "",
             "| matmul dtype | importance pass, median CPU s | per-round ratio to float32 (median) |", "|---|---:|---|",
             f"| float32 (`compute`) | {statistics.median(seconds['compute']):.1f} | 1.00 |",
             f"| bfloat16 | {statistics.median(seconds['bfloat16']):.1f} | {', '.join(f'{r:.2f}' for r in ratios)} ({statistics.median(ratios):.2f}) |", "",
             f"bf16 against float32, over samples, layers and rows (decoder layer output and each linear's): smallest cosine of the "
             f"per-token gradient vectors {result['min_cosine']:.4f}; share of the top-half tokens both pick: smallest "
             f"{result['min_top_half_overlap']:.3f}, median {result['median_top_half_overlap']:.3f}."]
    write_report(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
