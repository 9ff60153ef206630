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
import statistics
import sys

import torch

from activation_rank import capture_inputs
from tlq.config import ActQuantSpec, WeightQuantSpec, build_config
from tlq.quant.quantizer import fake_quantize_activation
from tlq.quant.rtn import rtn_fake_quantize
from tlq.quant.scale_search import ChannelStats, candidate_scales

W4 = WeightQuantSpec(bits=4, group_size=None, symmetric=True)  # the weights of w4a8 / w4a4
SMOOTHQUANT_ALPHA = build_config("w4a8", "smoothquant").search.fixed_alpha  # the smoothquant preset's own exponent


ERROR_TABLE_HEAD = ("| linear | token peak (median / max) | W4 per channel | A4 per token | A8 per token | A4 after SmoothQuant scale |\n"
                    "|---|---:|---:|---:|---:|---:|")  # per linear, then per kind of linear (rows: _row)


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
    tokens = token_peaks(x)
    return {
        "peak_median": float(tokens.median()),
        "peak_max": float(tokens.max()),
        "w4": float((x @ (rtn_fake_quantize(w.float(), W4).double() - w).T).norm() / norm),
        "a4": act_err(x, w, 4),
        "a8": act_err(x, w, 8),
        "a4_smoothed": act_err(x / s, w * s, 4),
    }


def token_peaks(x: torch.Tensor) -> torch.Tensor:
    """Each token's max |x| / rms x: 1 for a flat input, sqrt(width) for one channel holding everything."""
    return x.abs().amax(1) / x.pow(2).mean(1).sqrt().clamp(min=1e-12)


def peak_split(x: torch.Tensor, linear: torch.nn.Linear, above: float) -> dict[str, float]:
    """int4 per-token input error of the tokens whose peak exceeds ``above`` against the rest's.

    Why: a higher peak only hurts per-token scales where the small channels carry the output; a token whose
    one large channel carries it keeps that channel on its own int4 step. Also each group's share of the
    output's and of the error's energy, to say whether the peaky tokens matter at all."""
    w = linear.weight.detach().double()
    y = x @ w.T
    dy = (fake_quantize_activation(x.float(), ActQuantSpec(4)).double() - x) @ w.T
    hi = token_peaks(x) > above

    def rel(mask: torch.Tensor) -> float:
        return float(dy[mask].norm() / y[mask].norm()) if mask.any() else float("nan")

    return {
        "share_tokens": float(hi.double().mean()),
        "a4_above": rel(hi),
        "a4_rest": rel(~hi),
        "share_output": float(y[hi].pow(2).sum() / y.pow(2).sum()),
        "share_error": float(dy[hi].pow(2).sum() / dy.pow(2).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:needle-count-qwen2vl")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--peak-above", type=float, default=0.0,
                   help="also split each linear whose inputs can exceed this peak (sqrt(width) > it) into the tokens above it and the rest")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    linears: dict[str, torch.nn.Linear] = {}
    inputs = capture_inputs(args.model, args.num_samples, linears)
    print(f"{args.model}, {args.num_samples} calibration samples; output error ||dY|| / ||Y|| in %\n")
    print(ERROR_TABLE_HEAD)
    rows = {key: relative_errors(x, linears[key]) for key, x in inputs.items()}
    for key, e in rows.items():
        print(_row(key, e))
    print("\nMedian over layers, per kind of linear (the token peak's max is the largest of any layer):\n")
    print(ERROR_TABLE_HEAD)
    for kind, e in by_kind(rows).items():
        print(_row(kind, e))
    if args.peak_above > 0:
        print(f"\nTokens whose input peak exceeds {args.peak_above:g}, against the rest (A4 per token, RTN):\n")
        print("| linear | tokens above | A4 error, above | A4 error, rest | share of ||Y||^2 | share of ||dY||^2 |")
        print("|---|---:|---:|---:|---:|---:|")
        for key, x in inputs.items():
            if x.shape[1] ** 0.5 > args.peak_above:
                e = peak_split(x, linears[key], args.peak_above)
                print(f"| {key} | {100 * e['share_tokens']:.1f}% | {100 * e['a4_above']:.1f}% | {100 * e['a4_rest']:.1f}% | "
                      f"{100 * e['share_output']:.1f}% | {100 * e['share_error']:.1f}% |")
    return 0


def _row(name: str, e: dict[str, float]) -> str:
    return (f"| {name} | {e['peak_median']:.1f} / {e['peak_max']:.1f} | {100 * e['w4']:.2f} | {100 * e['a4']:.2f} | "
            f"{100 * e['a8']:.3f} | {100 * e['a4_smoothed']:.2f} |")


def by_kind(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per kind of linear (the name after the layer index, e.g. ``mlp.down_proj``): the median of each
    measure over the layers, except the token peak's max, which is the largest any layer reached (the
    bound sqrt(inputs) is what it is compared with)."""
    kinds: dict[str, list[dict[str, float]]] = {}
    for key, e in rows.items():
        kinds.setdefault(key.split(".", 1)[-1], []).append(e)
    return {
        kind: {m: (max if m == "peak_max" else statistics.median)([e[m] for e in es]) for m in es[0]}
        for kind, es in kinds.items()
    }


if __name__ == "__main__":
    sys.exit(main())
