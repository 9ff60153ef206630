"""Robust integration of raw per-token gradients into token weights.

Raw ``||g||^2`` is a poor weight on its own: many visual tokens have near-zero gradient (their error
would be ignored entirely) and a handful of tokens own most of the mass (MBQ section 4.3.2, QIG
Table 1). :func:`integrate` turns one sample's raw gradients ``[num_layers, seq]`` into weights with,
per layer row and over the sample's valid tokens only:

1. the base value by ``kind``: ``grad2`` = ``||g||^2``, ``grad`` = ``||g||``, ``modality`` = the
   per-modality mean of ``||g||^2`` (MBQ's weighting), ``uniform`` = 1 (plain PTQ; steps 2-6 skipped);
2. normalisation to mean 1 over the sample's tokens (``normalize_per_sample``), so that long,
   image-heavy samples and layers with large gradients do not dominate;
3. ``per_layer=False``: the mean over layers of the (normalised: each layer counts equally) rows,
   the same weight for every layer;
4. clipping at the row's ``clip_quantile`` (token kinds only: clipping a per-modality constant would
   change MBQ's weights): one token cannot own the objective;
5. mixing with the modality mean, ``w = lam * mean_{modality(t)} w + (1 - lam) * w`` (``modality_mix``
   = lam; preserves the row mean and never raises the max);
6. a floor, ``w >= floor * mean(w)`` (the mean after flooring, so it still holds after step 7), so
   that no token's error is ignored entirely;
7. renormalisation to mean 1 (``normalize_per_sample``).

Across samples, :func:`sample_factors` (``sample_weights="curvature"``) then scales each sample's weights
by how near its answer is to flipping, which the per-sample normalisation above leaves out.

The result is non-negative and finite; invalid tokens (padding) get 0. With normalisation on, a row
with no gradient at all (a sample without answer tokens) becomes uniform; with it off, weights stay in
raw gradient units and such a row stays 0. Defaults are a starting point, to be tuned by
measurement: they are configuration only.
"""

from __future__ import annotations


import math
from typing import Callable

import torch
from torch import Tensor

from tlq.config import ImportanceConfig



def layer_rows(t: Tensor) -> Tensor:
    """The decoder-layer rows ``[L, seq]`` of per-token values that may also have per-linear rows
    (``[L, 1 + K, seq]``, ``grad_at="linear"``, the layer's own row first)."""
    return t if t.dim() == 2 else t[:, 0]


def _row_mean(w: Tensor, valid: Tensor) -> Tensor:
    """Mean of each row over the valid tokens: [L, 1]."""
    n = valid.sum().clamp(min=1)
    return (w * valid).sum(-1, keepdim=True) / n


def modality_mean(w: Tensor, visual: Tensor, valid: Tensor) -> Tensor:
    """Each token replaced by the mean of its modality (visual / text) in its row, over valid tokens."""
    out = torch.zeros_like(w)
    for m in (visual & valid, ~visual & valid):
        if m.any():
            out[:, m] = ((w * m).sum(-1, keepdim=True) / m.sum()).expand(-1, int(m.sum()))
    return out


def _normalize(w: Tensor, valid: Tensor) -> Tensor:
    mean = _row_mean(w, valid)
    # A row without any mass (no answer token, or a dead layer) carries no information: uniform.
    return torch.where(mean > 0, w / mean.clamp(min=torch.finfo(w.dtype).tiny), valid.to(w.dtype).expand_as(w))


def _clip(w: Tensor, valid: Tensor, q: float) -> Tensor:
    cols = valid.nonzero().reshape(-1)
    if cols.numel() == 0:
        return w
    bound = torch.quantile(w[:, cols], q, dim=-1, keepdim=True)
    return torch.minimum(w, bound)


def _apply_floor(w: Tensor, valid: Tensor, floor: float) -> Tensor:
    """Raise each row to ``max(w, c)`` with ``c = floor * mean(max(w, c))``: the floor holds relative to
    the mean *after* flooring (so it survives renormalisation). Solved exactly per row: if the ``j``
    smallest tokens are raised, ``c = floor * S_j / (n - floor * j)`` with ``S_j`` the sum of the others."""
    cols = valid.nonzero().reshape(-1)
    n = cols.numel()
    if n == 0:
        return w
    s = w[:, cols].double().sort(-1).values  # [L, n] ascending
    suffix = torch.cat([s.flip(-1).cumsum(-1).flip(-1), torch.zeros(s.shape[0], 1, dtype=s.dtype)], -1)  # S_j, j=0..n
    j = torch.arange(n + 1, dtype=s.dtype)
    c = floor * suffix / (n - floor * j)  # [L, n+1]
    big = torch.full((s.shape[0], 1), math.inf, dtype=s.dtype)
    below = torch.cat([-big, s], -1)  # s_{j-1}
    above = torch.cat([s, big], -1)  # s_j
    tol = 1e-9 * (s.abs().amax(-1, keepdim=True) + 1e-30)
    ok = (below <= c + tol) & (c <= above + tol)
    first = ok.to(torch.int8).argmax(-1, keepdim=True)  # the root is unique; the first is it
    return torch.maximum(w, c.gather(1, first).to(w.dtype))


def integrate(raw: Tensor, visual_mask: Tensor, cfg: ImportanceConfig | None = None, valid_mask: Tensor | None = None) -> Tensor:
    """Token weights ``[num_layers, seq]`` (float32, >= 0, finite) from one sample's raw ``||g||^2``
    (``[num_layers, rows, seq]`` in and out for per-linear gradients, each row kind integrated alone).

    ``raw`` is the importance pass's default output (squared norms, ``[num_layers, seq]``);
    ``visual_mask`` [seq] marks visual tokens; ``valid_mask`` [seq] (default: all) marks the tokens that
    exist (not padding) — only they are normalised over and weighted.
    """
    cfg = cfg or ImportanceConfig()
    if raw.dim() == 3:  # [L, 1 + K, seq]: each kind of row (layer output, each linear) on its own
        return torch.stack([integrate(raw[:, r], visual_mask, cfg, valid_mask) for r in range(raw.shape[1])], 1)
    if raw.dim() != 2:
        raise ValueError(f"raw gradients must be [num_layers, seq] or [num_layers, rows, seq], got shape {tuple(raw.shape)}")
    seq = raw.shape[1]
    visual = visual_mask.reshape(-1).to(torch.bool).cpu()
    valid = torch.ones(seq, dtype=torch.bool) if valid_mask is None else valid_mask.reshape(-1).to(torch.bool).cpu()
    if visual.numel() != seq or valid.numel() != seq:
        raise ValueError(f"masks have {visual.numel()}/{valid.numel()} tokens, gradients {seq}")
    vf = valid.to(torch.float32)
    if cfg.kind == "uniform":
        return vf.expand(raw.shape[0], -1).clone()

    w = torch.nan_to_num(raw.detach().float().cpu(), nan=0.0, posinf=0.0).clamp(min=0) * vf
    if cfg.kind == "grad":
        w = w.sqrt()
    if cfg.normalize_per_sample:
        w = _normalize(w, valid)
    if cfg.kind == "modality":
        w = modality_mean(w, visual, valid)
    if not cfg.per_layer:
        w = w.mean(0, keepdim=True).expand_as(w).clone()
    if cfg.kind != "modality":
        if cfg.clip_quantile is not None and cfg.clip_quantile < 1.0:
            w = _clip(w, valid, cfg.clip_quantile)
        if cfg.modality_mix > 0:
            w = cfg.modality_mix * modality_mean(w, visual, valid) + (1 - cfg.modality_mix) * w
    if cfg.floor > 0:
        w = _apply_floor(w, valid, cfg.floor) * vf
    if cfg.normalize_per_sample:
        w = _normalize(w, valid)
    return w * vf


def sample_factors(curvatures: list[float], floor: float, reduce_sums: Callable[[list[float]], list[float]] | None = None) -> list[float]:
    """Each sample's share of the objective from its answer's softmax curvature (``sample_weights="curvature"``).

    ``c_i / mean(c)``, raised to at least ``floor`` (a share of the mean, so no sample drops out); a
    sample without a curvature (no answer token to score: nan) gets the floor. The mean is over the
    whole calibration set: ``reduce_sums`` sums ``[sum, count]`` over ranks (identity in one process),
    so a sample's factor does not depend on which rank holds it. A set whose answers are all sure
    (mean 0) has no preference: every factor is 1.
    """
    c = [x if math.isfinite(x) and x > 0 else 0.0 for x in curvatures]
    total, count = (reduce_sums or (lambda xs: xs))([math.fsum(c), float(len(c))])
    if not total > 0:
        return [1.0] * len(c)
    mean = total / count
    return [max(x / mean, floor) for x in c]
