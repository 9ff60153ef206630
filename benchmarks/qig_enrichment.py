"""Do QIG's token weights find the needle? Target enrichment of QIG's and of TLQ's weights, side by side.

On a needle model's calibration samples (the generator's ground truth says which visual tokens hold the
answer), per decoder layer: (share of the visual tokens' weight on the targets) / (the targets' share of
visual tokens); 1 = what uniform weights give. TLQ's weights are the integrated answer-loss gradients
(``tlq.importance``, the preset's ``grad_at="linear"``, the decoder layer's own row, every token kept);
QIG's are the integrated gradients of each layer's rounding error (``tlq.importance.integrated``), read
off a real calibration run (they depend on the quantized stream each layer sees).

    OMP_NUM_THREADS=1 python benchmarks/qig_enrichment.py --model needle-count-qwen2vl --out docs/needle/qig-enrichment-qwen2vl
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import STRESS_SCHEMES  # noqa: E402

from tlq.api import build_config, load_model  # noqa: E402
from tlq.builtin import builtin_set, resolve_model_dir  # noqa: E402
from tlq.config import ImportanceConfig, SelectionConfig  # noqa: E402
from tlq.data.calibration import build_sample  # noqa: E402
from tlq.data.records import choose, read_jsonl, relevant_visual_tokens  # noqa: E402
from tlq.engine import steps as S  # noqa: E402
from tlq.engine.layerwise import LayerwiseEngine  # noqa: E402
from tlq.importance.calibset import build_token_calibration_set  # noqa: E402
from tlq.importance.visualize import _enrichment, _target_positions  # noqa: E402
from tlq.importance.weights import layer_rows  # noqa: E402
from tlq.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


def capture_qig_weights(adapter: Any, model: Any, samples: list, cfg: Any, dev: Any) -> dict[tuple[int, int], torch.Tensor]:
    """Calibrate with ``cfg`` (QIG weighting) and keep every layer's weights: (layer, sample) -> [seq]."""
    phase, step = S.STEPS["integrated_gradients"]
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def keep(ctx: Any, state: Any) -> None:
        step(ctx, state)
        for s, gid in enumerate(ctx.sample_ids):
            seen[(ctx.index, gid)] = ctx.weights(s).clone()

    S.STEPS["integrated_gradients"] = (phase, keep)
    try:
        LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
    finally:
        S.STEPS["integrated_gradients"] = (phase, step)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a built-in needle model")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--scheme", default="w2a16", help="the rounding QIG attributes (w2a16: the needle models' gated cell)")
    p.add_argument("--ig-steps", type=int, default=ImportanceConfig.ig_steps, help="integration points of QIG's path (QIG's own: 32)")
    p.add_argument("--out", required=True, help="report path without extension")
    args = p.parse_args()
    t0 = time.perf_counter()
    ref = f"builtin:{args.model}"
    calib = builtin_set(resolve_model_dir(ref), "calib")
    records = choose(read_jsonl(calib), args.num_samples, seed=0)
    adapter, model, processor, _d, dev, _dt = load_model(ref, device="cpu")
    samples = [build_sample(r, processor, adapter, model, None, str(calib)) for r in records]
    truths = []
    for r, s in zip(records, samples):
        boxes = adapter.visual_token_boxes(model, s.inputs)
        truths.append(_target_positions(s.visual_mask, relevant_visual_tokens(r, boxes)))
    tcs = build_token_calibration_set(adapter, model, samples, ImportanceConfig(grad_at="linear"), SelectionConfig(token_fraction=1.0, token_floor=0), device=dev)
    grad_w = [layer_rows(w) for w in tcs.weights]
    stress, preset = STRESS_SCHEMES.get(args.scheme, (None, args.scheme))
    cfg = build_config(preset, "tlq", num_samples=args.num_samples, device="cpu", weighting="integrated", token_select=False)
    if stress is not None:
        cfg.scheme = stress
    cfg.importance = dc_replace(cfg.importance, ig_steps=args.ig_steps)
    qig = capture_qig_weights(adapter, model, samples, cfg, dev)
    num_layers = grad_w[0].shape[0]
    qig_w = [torch.stack([qig[(layer, i)] for layer in range(num_layers)]) for i in range(len(samples))]
    known = [i for i, t in enumerate(truths) if t is not None]  # samples with ground truth
    rows: dict[str, list[float]] = {}
    for name, ws in (("TLQ (answer-loss gradients)", grad_w), ("QIG (rounding-error integrated gradients)", qig_w)):
        per = torch.tensor([[float("nan") if v is None else v for v in _enrichment(ws[i], samples[i].visual_mask, truths[i])] for i in known],
                           dtype=torch.float64)
        rows[name] = [float(v) for v in per.nanmean(0)]
    share = sum(float(truths[i].sum()) / float(samples[i].visual_mask.sum()) for i in known) / len(known)
    result = {"model": args.model, "scheme": args.scheme, "ig_steps": args.ig_steps, "num_samples": len(samples), "samples_with_truth": len(known),
              "target_share_of_visual_tokens": share, "enrichment_per_layer": rows, "minutes": (time.perf_counter() - t0) / 60,
              "command": "python benchmarks/qig_enrichment.py " + " ".join(sys.argv[1:])}
    atomic_write_json(f"{args.out}.json", result)
    head = "| weights | " + " | ".join(f"L{k}" for k in range(num_layers)) + " |"
    lines = [f"# Target enrichment of token weights: {args.model}", "", f"Command: `{result['command']}` ({result['minutes']:.1f} min)", "",
             f"{result['samples_with_truth']} calibration samples with ground truth; the targets are {100 * share:.1f}% of the visual tokens "
             f"(the most any weighting can reach is ~{1 / share:.0f}). QIG attributes {args.scheme}'s rounding error, "
             f"integrated over {args.ig_steps} points.", "",
             head, "|" + "---|" * (num_layers + 1)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for name, vals in rows.items()]
    atomic_write_text(f"{args.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
