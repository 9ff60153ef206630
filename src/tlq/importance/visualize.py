"""Token-importance reports: ``run_importance`` writes tensors, a JSON summary and one PNG per sample.

Output directory::

    importance.safetensors   per sample i (``sample_XXX.`` prefix): ``raw`` float32 [L, seq] (||g||^2),
                             ``weights`` float32 [L, seq] (integrated), ``visual_mask`` / ``answer_mask``
                             bool [seq], ``input_ids`` int64 [seq]; metadata: model, calib, config (JSON)
    importance.json          per-layer mean weight (and mean raw ||g||^2) of visual vs text tokens, over all
                             samples and per sample, plus the losses and the PNG names
    sample_XXX.png           the image with its visual tokens' importance (mean over layers of the
                             integrated weight) as a heatmap on the token grid, and the text tokens in order,
                             each on a background whose colour shows its weight (same colour scale)

Only PIL is used for drawing. The visual-token layout comes from the adapter's ``visual_token_grid``
(Qwen: the merged-token grid; LLaVA-OneVision: the base tile only).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from tlq.builtin import default_dataset, resolve_model_dir
from tlq.config import CalibConfig
from tlq.importance.calibset import SelectionConfig, TokenCalibrationSet, sample_valid_mask
from tlq.importance.gradients import token_gradients
from tlq.importance.weights import ImportanceConfig, integrate, layer_rows
from tlq.utils.io import atomic_save, atomic_write_json
from tlq.utils.outputs import check_output_dir, staged_output

# YlOrRd-like ramp: pale yellow (low) -> orange -> red -> dark red (high).
_RAMP = ((255, 255, 217), (254, 217, 118), (253, 141, 60), (227, 26, 28), (128, 0, 38))


# --- colours and fonts -------------------------------------------------------------------------
def colormap(v: float) -> tuple[int, int, int]:
    """``v`` in [0, 1] -> RGB on the ramp (clamped)."""
    v = min(max(float(v), 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(v), len(_RAMP) - 2)
    f = v - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))  # type: ignore[return-value]


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def measure_text(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return int(box[2] - box[0])


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads on ``rgb``."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _token_label(text: str) -> str:
    if text == "":
        return "∅"
    label = text.replace("\n", "\\n").replace("\t", "\\t")
    return label if label.strip() else "·" * len(label)


# --- drawing -----------------------------------------------------------------------------------
def heatmap_overlay(image: Image.Image, grid: tuple[int, int], values: Tensor, vmax: float, size: int = 256, alpha: float = 0.6, targets: list[int] | None = None) -> Image.Image:
    """``image`` (longer side scaled to ``size``) with ``values`` [rows*cols] as coloured cells on ``grid``;
    ``targets`` (cell indices, row-major: the ground-truth tokens) are outlined in blue."""
    rows, cols = grid
    w, h = image.size
    scale = size / max(w, h)
    disp = image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    cells = Image.new("RGB", (cols, rows))
    cells.putdata([colormap(float(v) / vmax if vmax > 0 else 0.0) for v in values.reshape(-1).tolist()])
    cells = cells.resize(disp.size, Image.NEAREST)
    out = Image.blend(disp, cells, alpha)
    draw = ImageDraw.Draw(out)
    for r in range(1, rows):  # faint grid lines: one cell = one visual token
        y = round(r * disp.size[1] / rows)
        draw.line([(0, y), (disp.size[0], y)], fill=(255, 255, 255), width=1)
    for c in range(1, cols):
        x = round(c * disp.size[0] / cols)
        draw.line([(x, 0), (x, disp.size[1])], fill=(255, 255, 255), width=1)
    for t in [t for t in targets or () if int(t) < rows * cols]:  # tokens past the grid (anyres tiles) are not drawn
        r, c = divmod(int(t), cols)
        x0, y0 = round(c * disp.size[0] / cols), round(r * disp.size[1] / rows)
        x1, y1 = round((c + 1) * disp.size[0] / cols) - 1, round((r + 1) * disp.size[1] / rows) - 1
        draw.rectangle([(x0, y0), (x1, y1)], outline=(0, 90, 255), width=2)
    return out


def render_sample(*, image: Image.Image | None, grid: tuple[int, int] | None, tokens: list[str], weights: Tensor, visual_mask: Tensor, answer_mask: Tensor, title: str, notes: list[str] | None = None, panel: int = 256, text_width: int = 560, targets: list[int] | None = None) -> Image.Image:
    """One sample's report image.

    ``weights`` [seq] is the per-token importance to draw (e.g. mean over layers of the integrated
    weight); ``tokens`` [seq] the decoded tokens. Left: the image and its heatmap (the first
    ``rows * cols`` visual tokens on ``grid``); right: the text tokens in order, the run of visual tokens
    collapsed into one ``[image ...]`` chip (mean weight), answer tokens underlined. One colour scale
    (0 .. the sample's max weight) for both, shown by the bar at the bottom. ``targets``: ground-truth
    visual tokens (grid cells) to outline.
    """
    font, small = load_font(14), load_font(12)
    pad, line_h = 10, 22
    w = weights.float().reshape(-1)
    vis = visual_mask.reshape(-1).to(torch.bool)
    ans = answer_mask.reshape(-1).to(torch.bool)
    vmax = float(w.max()) if w.numel() else 1.0
    vmax = vmax if vmax > 0 else 1.0

    # Left panel: original + heatmap, side by side.
    left: list[Image.Image] = []
    grid_note = None
    if image is not None:
        scale = panel / max(image.size)
        left.append(image.convert("RGB").resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))), Image.BICUBIC))
        n_vis = int(vis.sum())
        if grid is not None and grid[0] * grid[1] <= n_vis and grid[0] * grid[1] > 0:
            vals = w[vis][: grid[0] * grid[1]]
            left.append(heatmap_overlay(image, grid, vals, vmax, size=panel, targets=targets))
            extra = "" if grid[0] * grid[1] == n_vis else f" (first {grid[0] * grid[1]} of {n_vis} visual tokens: base tile)"
            grid_note = f"heatmap: {grid[0]}x{grid[1]} visual-token grid{extra}"
        else:
            grid_note = "no visual-token layout known for this model: heatmap not drawn"
    left_w = sum(im.size[0] for im in left) + pad * max(0, len(left) - 1)
    left_h = max((im.size[1] for im in left), default=0)

    # Right panel: token chips, wrapped.
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    chips: list[tuple[str, float, bool, bool]] = []  # label, weight, is_answer, newline after
    i, seq = 0, w.numel()
    while i < seq:
        if vis[i]:
            j = i
            while j < seq and vis[j]:
                j += 1
            chips.append((f"[image: {j - i} tokens]", float(w[i:j].mean()), False, False))
            i = j
            continue
        text = tokens[i]
        chips.append((_token_label(text), float(w[i]), bool(ans[i]), text.endswith("\n")))
        i += 1
    placed: list[tuple[int, int, int, str, float, bool]] = []  # x, y, width, label, weight, answer
    x = y = 0
    for label, wt, is_ans, newline in chips:
        cw = measure_text(scratch, label, font) + 6
        if x > 0 and x + cw > text_width:
            x, y = 0, y + line_h
        placed.append((x, y, cw, label, wt, is_ans))
        x += cw + 2
        if newline:
            x, y = 0, y + line_h
    text_h = (y + line_h) if placed else 0

    header = [title] + (notes or []) + ([grid_note] if grid_note else [])
    header_h = len(header) * 18 + pad
    bar_h = 40
    body_h = max(left_h, text_h)
    width = pad + left_w + (pad * 2 if left else 0) + text_width + pad
    height = pad + header_h + body_h + pad + bar_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(header):
        draw.text((pad, pad + 18 * k), line, fill=(0, 0, 0), font=font if k == 0 else small)
    top = pad + header_h
    cx = pad
    for im in left:
        canvas.paste(im, (cx, top))
        cx += im.size[0] + pad
    tx = pad + left_w + (pad * 2 if left else 0)
    for px, py, cw, label, wt, is_ans in placed:
        bg = colormap(wt / vmax)
        box = (tx + px, top + py, tx + px + cw, top + py + line_h - 4)
        draw.rectangle(box, fill=bg, outline=(200, 200, 200))
        draw.text((tx + px + 3, top + py + 1), label, fill=_ink(bg), font=font)
        if is_ans:
            draw.line([(box[0], box[3] + 1), (box[2], box[3] + 1)], fill=(0, 70, 200), width=2)

    # Colour bar.
    by = top + body_h + pad
    bx0, bx1 = pad + 60, min(width - pad - 80, pad + 60 + 400)
    for px in range(bx0, bx1):
        draw.line([(px, by), (px, by + 12)], fill=colormap((px - bx0) / max(1, bx1 - bx0 - 1)))
    draw.rectangle((bx0, by, bx1, by + 12), outline=(120, 120, 120))
    draw.text((pad, by - 1), "weight", fill=(0, 0, 0), font=small)
    draw.text((bx0, by + 15), "0", fill=(0, 0, 0), font=small)
    hi = f"{vmax:.3g}"
    draw.text((bx1 - measure_text(draw, hi, small), by + 15), hi, fill=(0, 0, 0), font=small)
    draw.text((bx1 + 10, by - 1), "answer tokens underlined", fill=(0, 70, 200), font=small)
    return canvas


# --- runner ------------------------------------------------------------------------------------
def _modality_means(x: Tensor, visual: Tensor) -> tuple[list[float | None], list[float | None]]:
    """Per-layer mean of ``x`` [L, seq] over visual and over text tokens (None if the modality is absent)."""
    def mean(m: Tensor) -> list[float | None]:
        return x[:, m].mean(-1).tolist() if m.any() else [None] * x.shape[0]

    return mean(visual), mean(~visual)


def run_importance(model: str | Path, calib_jsonl: str | Path | None, out_dir: str | Path, *, num_samples: int = 8, max_seq_len: int | None = CalibConfig.max_seq_len, cfg: ImportanceConfig | None = None, selection: SelectionConfig | None = None, device: str = "auto", dtype: str = "auto", seed: int = 0, overwrite: bool = False, draw: bool = True, progress: bool = False) -> dict[str, Any]:
    """Run the importance pass on calibration samples and write the report files (see module doc).

    ``model`` is a local checkpoint or ``builtin:NAME``; ``calib_jsonl=None`` uses a built-in model's
    own calibration set. Samples are chosen as ``tlq quantize`` chooses them (``num_samples``, ``seed``).
    ``selection``: also summarise the token calibration set that budget would give. Returns the
    summary written to ``importance.json``.
    """
    from tlq.api import load_model
    from tlq.data.calibration import build_sample
    from tlq.data.records import choose, relevant_visual_tokens
    from tlq.preflight import check_calibration, check_model_dir

    t0 = time.perf_counter()
    cfg = cfg or ImportanceConfig()
    calib = default_dataset(model, "calib", calib_jsonl)
    out = check_output_dir(out_dir, overwrite, "--out", [("model directory", resolve_model_dir(model)), ("calibration file", calib)])
    check_model_dir(model)
    records = choose(check_calibration(calib, num_samples), num_samples, seed)
    adapter, hf_model, processor, _model_dir, dev, dt = load_model(model, device, dtype)
    samples = [build_sample(r, processor, adapter, hf_model, max_seq_len, str(calib)) for r in records]
    grads = token_gradients(adapter, hf_model, samples, device=dev, progress=progress, at=cfg.grad_at, matmul_dtype=cfg.matmul_dtype)
    valids = [sample_valid_mask(s) for s in samples]
    full = [integrate(g.grad, s.visual_mask, cfg, v) for g, s, v in zip(grads, samples, valids)]
    # Saved in full below; drawn and summarised per decoder layer (per-linear rows: the layer's own row).
    weights = [layer_rows(w) for w in full]
    raws = [layer_rows(g.grad) for g in grads]

    num_layers = int(weights[0].shape[0])
    with staged_output(out, "importance") as staging:  # built aside, moved into place once complete
        tensors: dict[str, Tensor] = {}
        per_sample: list[dict[str, Any]] = []
        targets: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        tokenizer = getattr(processor, "tokenizer", processor)
        for i, (rec, s, g, w, raw) in enumerate(zip(records, samples, grads, weights, raws)):
            p = f"sample_{i:03d}"
            tensors[f"{p}.raw"] = g.grad.contiguous()
            tensors[f"{p}.weights"] = full[i].contiguous()
            tensors[f"{p}.visual_mask"] = s.visual_mask.contiguous()
            tensors[f"{p}.answer_mask"] = s.answer_mask.contiguous()
            tensors[f"{p}.input_ids"] = s.inputs["input_ids"][0].contiguous()
            vis_w, txt_w = _modality_means(w, s.visual_mask)
            vis_r, txt_r = _modality_means(raw, s.visual_mask)
            grid = adapter.visual_token_grid(hf_model, s.inputs)
            boxes = adapter.visual_token_boxes(hf_model, s.inputs)
            truth = relevant_visual_tokens(rec, boxes) if boxes is not None and len(boxes) == int(s.visual_mask.sum()) else None
            target_mask = _target_positions(s.visual_mask, truth)
            entry: dict[str, Any] = {
                "index": i,
                "line": rec.line,
                "image": str(rec.image) if rec.image is not None else None,
                "seq_len": s.seq_len,
                "num_visual": int(s.visual_mask.sum()),
                "num_text": int((~s.visual_mask).sum()),
                "num_answer": g.num_answer_tokens,
                "loss": _finite(g.loss),
                "answer_curvature": _finite(g.curvature),  # 1 - sum p^2: how near the answer is to flipping
                "visual_token_grid": list(grid) if grid else None,
                "mean_weight_visual_per_layer": vis_w,
                "mean_weight_text_per_layer": txt_w,
                "mean_grad2_visual_per_layer": vis_r,
                "mean_grad2_text_per_layer": txt_r,
                "target_tokens": [i for i, t in enumerate(truth) if t] if truth else None,
                "target_enrichment_per_layer": _enrichment(w, s.visual_mask, target_mask) if target_mask is not None else None,
                "png": None,
            }
            if target_mask is not None:
                targets.append((w, raw, s.visual_mask, target_mask))
            if draw:
                image = Image.open(rec.image).convert("RGB") if rec.image is not None else None
                ids = s.inputs["input_ids"][0].tolist()
                toks = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
                lines = [
                    "mean weight per layer, visual / text: "
                    + "  ".join(f"L{k} {_fmt(a)}/{_fmt(b)}" for k, (a, b) in enumerate(zip(vis_w, txt_w)))[:150],
                ]
                title = (
                    f"sample {i} (line {rec.line})  {adapter.spec.family}  kind={cfg.kind}  loss={g.loss:.3f}  "
                    f"{entry['num_visual']} visual / {entry['num_text']} text tokens  (colour: mean over {num_layers} layers)"
                )
                if entry["target_enrichment_per_layer"]:
                    lines.append("target enrichment per layer (mass share / token share among visual tokens): " + "  ".join(f"L{k} {_fmt(e)}" for k, e in enumerate(entry["target_enrichment_per_layer"]))[:150])
                png = render_sample(image=image, grid=grid, tokens=toks, weights=w.mean(0), visual_mask=s.visual_mask, answer_mask=s.answer_mask, title=title, notes=lines, targets=entry["target_tokens"])
                name = f"{p}.png"
                atomic_save(staging / name, lambda t, im=png: im.save(t, format="PNG"))
                entry["png"] = name
            per_sample.append(entry)

        from safetensors.torch import save_file

        meta = {"model": str(model), "calib": str(calib), "num_samples": str(len(samples)), "config": json.dumps(cfg.to_dict())}
        atomic_save(staging / "importance.safetensors", lambda t: save_file(tensors, t, metadata=meta))

        summary: dict[str, Any] = {
            "model": str(model),
            "model_type": adapter.spec.family,
            "calib": str(calib),
            "device": str(dev),
            "dtype": str(dt).replace("torch.", ""),
            "num_samples": len(samples),
            "num_layers": num_layers,
            "config": cfg.to_dict(),
            "mean_loss": _finite(sum(losses) / len(losses)) if (losses := [g.loss for g in grads if g.loss == g.loss]) else None,
            "per_layer": _aggregate(weights, raws, [s.visual_mask for s in samples]),
            "samples": per_sample,
            "files": {"tensors": "importance.safetensors", "pngs": [e["png"] for e in per_sample if e["png"]]},
        }
        if targets:
            summary["target_enrichment"] = _enrichment_summary(targets)
        if selection is not None:
            tcs = TokenCalibrationSet.select(weights, [s.visual_mask for s in samples], selection, valids, cfg)
            summary["calibration_set"] = tcs.summary()
        summary["seconds"] = time.perf_counter() - t0
        atomic_write_json(staging / "importance.json", summary)
    return summary


def _target_positions(visual_mask: Tensor, truth: list[bool] | None) -> Tensor | None:
    """Sequence positions of the ground-truth visual tokens (bool [seq]); ``None`` without ground truth."""
    if not truth or not any(truth):
        return None
    out = torch.zeros_like(visual_mask, dtype=torch.bool)
    out[visual_mask.nonzero().reshape(-1)[: len(truth)]] = torch.tensor(truth)
    return out


def _enrichment(x: Tensor, visual: Tensor, target: Tensor) -> list[float | None]:
    """Per layer: (share of the visual tokens' mass on the targets) / (targets' share of visual tokens).

    1 = the targets get what uniform weighting gives them; 10 = ten times that. Measured among visual
    tokens because the ground truth only describes them.
    """
    mass = x[:, visual].double().sum(-1)
    on_target = x[:, target].double().sum(-1)
    token_share = float(target.sum()) / float(visual.sum())
    return [_finite(float(t / m) / token_share) if float(m) > 0 else None for t, m in zip(on_target, mass)]


def _enrichment_summary(items: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> dict[str, Any]:
    """Over samples with ground truth: mean per-layer enrichment of the weights and of raw ||g||^2, and
    the share of samples whose single most important visual token (mean over layers) is a target."""
    out: dict[str, Any] = {"num_samples": len(items)}
    for name, k in (("weight", 0), ("grad2", 1)):
        per = torch.tensor([[v if v is not None else float("nan") for v in _enrichment(it[k], it[2], it[3])] for it in items], dtype=torch.float64)
        out[f"{name}_per_layer"] = [_finite(float(v)) for v in per.nanmean(0)]
    hits = 0
    for w, _raw, vis, tgt in items:
        pos = vis.nonzero().reshape(-1)
        hits += bool(tgt[pos[int(w.mean(0)[vis].argmax())]])
    out["top1_visual_token_is_target"] = hits / len(items)
    out["target_share_of_visual_tokens"] = sum(float(it[3].sum()) / float(it[2].sum()) for it in items) / len(items)
    return out


def _finite(v: float) -> float | None:
    """JSON has no NaN: a sample without answer tokens reports ``null``."""
    return v if v == v and abs(v) != float("inf") else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _aggregate(weights: list[Tensor], raws: list[Tensor], visuals: list[Tensor]) -> dict[str, list[float | None]]:
    """Per layer, over all samples' tokens: mean weight and mean raw ||g||^2 of visual vs text tokens."""
    num_layers = weights[0].shape[0]
    out: dict[str, list[float | None]] = {}
    for name, xs in (("weight", weights), ("grad2", raws)):
        for mod, pick in (("visual", lambda m: m), ("text", lambda m: ~m)):
            tot = torch.zeros(num_layers, dtype=torch.float64)
            n = 0
            for x, m in zip(xs, visuals):
                sel = pick(m)
                tot += x[:, sel].double().sum(-1)
                n += int(sel.sum())
            out[f"mean_{name}_{mod}"] = (tot / n).tolist() if n else [None] * num_layers
    vis_share = torch.zeros(num_layers, dtype=torch.float64)
    total = torch.zeros(num_layers, dtype=torch.float64)
    for w, m in zip(weights, visuals):
        vis_share += w[:, m].double().sum(-1)
        total += w.double().sum(-1)
    out["visual_weight_share"] = (vis_share / total.clamp(min=1e-30)).tolist()
    return out
