"""Where a W-A scheme's error comes from: each decoder linear's output error from quantizing only its
weights (int4 per channel, RTN) against only its inputs (int4 / int8 dynamic per token, RTN), with and
without a SmoothQuant-style per-channel scale between them.

Why: on the needle models no baseline loses 2 points at W4A8 or W4A4 (docs/needle.md). If the inputs'
per-token quantization costs little next to the weights', a W-A scheme is a weight-only scheme in
disguise, and no activation-aware method can show anything on it. Released LLMs and VLMs are known for
the opposite: a few input channels, on a few tokens, far above the rest, which per-token scales cannot
absorb. ``peak`` (max |x| / rms x of one token's input) says which regime a model is in.

    python benchmarks/activation_error.py --model builtin:needle-count-qwen2vl --num-samples 32
"""

from __future__ import annotations

import argparse
import sys

import torch

from activation_rank import capture_inputs
from tlq.config import ActQuantSpec, WeightQuantSpec, build_config
from tlq.quant.quantizer import fake_quantize_activation
from tlq.quant.rtn import rtn_fake_quantize
from tlq.quant.scale_search import ChannelStats, candidate_scales

W4 = WeightQuantSpec(bits=4, group_size=None, symmetric=True)  # the weights of w4a8 / w4a4
SMOOTHQUANT_ALPHA = build_config("w4a8", "smoothquant").search.fixed_alpha  # the smoothquant preset's own exponent


def relative_errors(x: torch.Tensor, linear: torch.nn.Linear) -> dict[str, float]:
    """Output errors ||dY|| / ||Y|| (Y = x W^T) of weight-only and input-only quantization; the smoothed
    case uses the scale SmoothQuant itself would fold (x / s, W * s keep x W^T)."""
    w = linear.weight.detach().double()
    y = x @ w.T
    norm = y.norm()

    def act_err(xs: torch.Tensor, ws: torch.Tensor, bits: int) -> float:
        dx = fake_quantize_activation(xs.float(), ActQuantSpec(bits)).double() - xs
        return float((dx @ ws.T).norm() / norm)

    stats = ChannelStats(x.abs().mean(0).float(), x.abs().amax(0).float())
    s = candidate_scales("smoothquant", SMOOTHQUANT_ALPHA, stats, [linear]).double()
    tokens = x.abs().amax(1) / x.pow(2).mean(1).sqrt().clamp(min=1e-12)
    return {
        "peak_median": float(tokens.median()),
        "peak_max": float(tokens.max()),
        "w4": float((x @ (rtn_fake_quantize(w.float(), W4).double() - w).T).norm() / norm),
        "a4": act_err(x, w, 4),
        "a8": act_err(x, w, 8),
        "a4_smoothed": act_err(x / s, w * s, 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:needle-count-qwen2vl")
    p.add_argument("--num-samples", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    linears: dict[str, torch.nn.Linear] = {}
    inputs = capture_inputs(args.model, args.num_samples, linears)
    print(f"{args.model}, {args.num_samples} calibration samples; output error ||dY|| / ||Y|| in %\n")
    print("| linear | token peak (median / max) | W4 per channel | A4 per token | A8 per token | A4 after SmoothQuant scale |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, x in inputs.items():
        e = relative_errors(x, linears[key])
        print(f"| {key} | {e['peak_median']:.1f} / {e['peak_max']:.1f} | {100 * e['w4']:.2f} | {100 * e['a4']:.2f} | "
              f"{100 * e['a8']:.3f} | {100 * e['a4_smoothed']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
