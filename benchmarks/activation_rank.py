"""Effective rank of each decoder linear's calibration inputs: how many principal directions hold 90% and
99% of the input energy, against the linear's input width.

Why: a weight's quantization error only matters along the directions its inputs use. When a model's
activations span a few directions of a wide layer (small models trained on narrow synthetic tasks do),
most of the error falls where no input looks, and every data-driven method recovers FP16 accuracy even at
2-3 bits; released VLMs are not like that. This measures which regime a built-in model is in.

    python benchmarks/activation_rank.py --model builtin:needle-qwen2vl --num-samples 64
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch


def capture_inputs(model_name: str, num_samples: int, linears: dict[str, torch.nn.Linear] | None = None) -> dict[str, torch.Tensor]:
    """Every decoder linear's inputs over the model's own calibration set, as [rows, width] float64
    (and, into ``linears`` when given, each linear module under the same key)."""
    from tlq.builtin import builtin_set, default_dataset
    from tlq.data.calibration import load_calibration
    from tlq.pipeline import load_model

    adapter, model, processor, model_dir, _dev, _dt = load_model(model_name, "cpu", "float32")
    calib = builtin_set(model_dir, "calib") or default_dataset(model_name, "calib", None)
    samples = load_calibration(calib, processor, adapter, model, num_samples=num_samples, max_seq_len=None, seed=0)
    rows: dict[str, list[torch.Tensor]] = {}

    def hook(key: str) -> Any:
        return lambda _m, args, _out: rows.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    found = {f"{i}.{name}": m for i, layer in enumerate(adapter.decoder_layers(model))
             for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    if linears is not None:
        linears.update(found)
    handles = [m.register_forward_hook(hook(k)) for k, m in found.items()]
    try:
        with torch.no_grad():
            for s in samples:
                model(**s.inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).double() for k, v in rows.items()}


def energy_rank(x: torch.Tensor, share: float) -> int:
    """The fewest principal directions of ``x``'s rows that hold ``share`` of its energy."""
    return rank_holding(torch.linalg.svdvals(x) ** 2, share)


def rank_holding(energy: torch.Tensor, share: float) -> int:
    """The fewest of the directions whose energies are ``energy`` (in decreasing order) holding ``share`` of
    the total (``energy``: squared singular values of the rows, or the eigenvalues of ``sum x x^T``)."""
    return int((energy.cumsum(0) / energy.sum() < share).sum()) + 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:needle-qwen2vl")
    p.add_argument("--num-samples", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.model}, {args.num_samples} calibration samples\n\n| linear | input width | rank (90% energy) | rank (99% energy) |\n|---|---:|---:|---:|")
    for key, x in capture_inputs(args.model, args.num_samples).items():
        print(f"| {key} | {x.shape[1]} | {energy_rank(x, 0.90)} | {energy_rank(x, 0.99)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
