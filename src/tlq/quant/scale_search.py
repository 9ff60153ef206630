"""Per-channel scale migration: AWQ-style and SmoothQuant-style, with a searched exponent.

A linear ``y = W x`` is rewritten exactly as ``y = (W diag(s)) (x / s)``; ``1/s`` is folded into the
module that produces ``x`` (an RMSNorm weight, or the output rows of a preceding linear), ``s`` into the
columns of ``W``. Choosing ``s`` well moves quantization difficulty between weights and activations:

* AWQ (Lin et al., 2024): ``s = mean_t |x_t|^alpha`` protects salient input channels of the weights;
* SmoothQuant (Xiao et al., 2023): ``s = max|x|^a / max|W|^(1-a)`` flattens activation outliers so
  8-bit per-token activations survive.

The exponent is chosen on a grid by minimising a loss the caller supplies (the engine passes the
token-weighted output error of the decoder layer, which is what makes the search TLQ's, MBQ's or plain
AWQ's). This module knows nothing about models: it sees a producer module, linears and tensors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from tlq.utils.finite import NonFiniteError, check_finite, dtype_hint

SCALE_KINDS = ("awq", "smoothquant")


@dataclass
class ChannelStats:
    """Per-input-channel activation statistics of the linears' shared input (token-weighted)."""

    abs_mean: Tensor  # [in]
    abs_max: Tensor  # [in]


class ChannelStatsAccumulator:
    """Accumulates token-weighted mean |x| and max |x| per channel (tokens with weight 0 are ignored)."""

    def __init__(self, in_features: int) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32)
        self.total = 0.0

    def add(self, x: Tensor, weights: Tensor | None = None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().abs().cpu()
        w = torch.ones(rows.shape[0]) if weights is None else weights.detach().reshape(-1).float().cpu()
        keep = w > 0
        rows, w = rows[keep], w[keep]
        if rows.numel() == 0:
            return
        self.abs_sum += (rows * w[:, None]).sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, rows.amax(0))
        self.total += float(w.sum())

    def result(self) -> ChannelStats:
        if self.total <= 0:
            raise RuntimeError("no tokens with positive weight reached these linears")
        return ChannelStats((self.abs_sum / self.total).float(), self.abs_max.clone())


def candidate_scales(kind: str, alpha: float, stats: ChannelStats, linears: list[nn.Linear], eps: float = 1e-5) -> Tensor:
    """The per-channel scale ``s`` of one grid point; normalised so that its geometric range is centred on 1."""
    if kind == "awq":
        s = stats.abs_mean.clamp(min=eps).pow(alpha)
    elif kind == "smoothquant":
        w_max = torch.stack([lin.weight.detach().abs().amax(dim=0).float().cpu() for lin in linears]).amax(0)
        s = stats.abs_max.clamp(min=eps).pow(alpha) / w_max.clamp(min=eps).pow(1 - alpha)
    else:
        raise ValueError(f"unknown scale kind {kind!r}; choose one of {SCALE_KINDS}")
    s = s.clamp(min=eps)
    return s / (s.max() * s.min()).sqrt()


def can_fold(prev: nn.Module, linears: list[nn.Linear]) -> bool:
    """Whether ``1/s`` can be folded into ``prev`` exactly (a norm weight, or a linear's output rows).
    ``linears`` may hold any module with a ``[out, in]`` weight (a MoE router is one, not an nn.Linear)."""
    n = linears[0].weight.shape[-1]
    if any(lin.weight.shape[-1] != n for lin in linears):
        return False
    if isinstance(prev, nn.Linear):
        return prev.out_features == n
    weight = getattr(prev, "weight", None)
    return isinstance(weight, Tensor) and weight.ndim == 1 and weight.shape[0] == n


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: Tensor, offset: float = 0.0) -> None:
    """Apply ``x -> x / s`` in the producer and ``W -> W diag(s)`` in every consumer (exact in real arithmetic).

    ``offset``: the producer is a norm that multiplies by ``offset + weight`` (Qwen3.5's ``1 + w``).
    """
    if isinstance(prev, nn.Linear):
        sv = s.to(prev.weight)
        prev.weight.div_(sv[:, None])
        if prev.bias is not None:
            prev.bias.div_(sv)
    elif offset:
        prev.weight.copy_((prev.weight.double() + offset).div_(s.double().to(prev.weight.device)).sub_(offset).to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])


@contextmanager
def candidate_applied(linears: list[nn.Linear], s: Tensor) -> Iterator[None]:
    """Evaluate scales ``s`` without folding them: ``W -> W diag(s)`` and ``x -> x / s`` at the linears' inputs.

    In real arithmetic this is what :func:`fold_scales` does (the producer's output reaches only these
    linears), but the producer and everything upstream stay untouched, so a caller may record the
    inputs of the linears' block once and replay only the block for every candidate.
    """
    saved = [lin.weight.detach().clone() for lin in linears]
    handles = []
    sv = s.to(linears[0].weight)  # moved to the layer's device once, not per linear
    try:
        for lin in linears:
            lin.weight.data.mul_(sv.to(lin.weight)[None, :])
            handles.append(lin.register_forward_pre_hook(_divide_input(sv), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for lin, w in zip(linears, saved):
            lin.weight.data.copy_(w)


def _divide_input(s: Tensor) -> Callable:
    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (args[0] / s.to(args[0].dtype), *args[1:])

    return hook


@dataclass
class SearchResult:
    alpha: float
    loss: float
    baseline_loss: float  # loss of the unscaled group (alpha = 0 for AWQ is the same as no scaling)
    losses: list[float]


@torch.no_grad()
def search_scales(kind: str, prev: nn.Module, linears: list[nn.Linear], stats: ChannelStats, alphas: list[float], loss_fn: Callable[[], float],
                  passive: list[nn.Module] = (), offset: float = 0.0, coarse: int = 1) -> SearchResult:
    """Try the exponents (applied by :func:`candidate_applied`), let ``loss_fn`` quantize-and-measure; fold the best.

    ``loss_fn`` must leave the weights as it found them (it may fake-quantize temporarily). The
    unscaled configuration is always a candidate, so the search never makes the loss worse.
    ``passive`` modules read ``prev``'s output too and stay unquantized: the fold includes them (see
    :func:`fold_scales` for ``offset``). ``coarse`` > 1 tries the grid coarse-to-fine
    (:func:`coarse_to_fine`); the exponents left out have a NaN loss in the result.
    """
    baseline = loss_fn()
    if not math.isfinite(baseline):  # a candidate's NaN merely loses; the unscaled model's means bad inputs
        raise NonFiniteError(f"non-finite scale-search loss without scaling ({baseline}): the activations reaching {len(linears)} linear(s) "
                             f"overflowed; {dtype_hint(linears[0].weight.dtype)}")

    def loss_at(alpha: float) -> float:
        if kind == "awq" and alpha == 0.0:  # s = mean|x|^0 = 1 exactly: the unscaled layer, measured already
            return baseline
        with candidate_applied(linears, candidate_scales(kind, alpha, stats, linears)):
            return loss_fn()

    tried = coarse_to_fine(alphas, coarse, loss_at)
    losses = [tried.get(i, math.nan) for i in range(len(alphas))]
    best_alpha, best_loss = None, baseline
    for i in sorted(tried):  # in grid order, strictly better only: ties keep the smaller exponent
        if tried[i] < best_loss:
            best_alpha, best_loss = alphas[i], tried[i]
    if best_alpha is not None:
        scales = candidate_scales(kind, best_alpha, stats, linears)
        check_finite(scales, "the chosen smoothing scales", "the channel statistics hold NaN/Inf or zeros; " + dtype_hint(scales.dtype))
        fold_scales(prev, [*linears, *passive], scales, offset)
    return SearchResult(alpha=float("nan") if best_alpha is None else best_alpha, loss=best_loss, baseline_loss=baseline, losses=losses)


def coarse_to_fine(alphas: list[float], coarse: int, loss_at: Callable[[float], float]) -> dict[int, float]:
    """The losses of the grid points tried, by index: every ``coarse``-th exponent first, then the
    ``coarse - 1`` neighbours on each side of the best of those (``coarse`` = 1: every exponent).

    Why: the scale search's cost is one quantized forward per exponent, and its loss over the exponent
    is smooth; a 20-point grid searched 3 apart costs 11 losses instead of 20. Whether it picks the same
    exponents is measured (docs/cost.md), not assumed. A NaN loss never counts as the best.
    """
    if coarse < 1:
        raise ValueError(f"coarse must be >= 1, got {coarse}")
    tried = {i: loss_at(alphas[i]) for i in range(0, len(alphas), coarse)}
    if coarse > 1 and tried:
        finite = [i for i in sorted(tried) if math.isfinite(tried[i])]
        if finite:
            k = min(finite, key=lambda i: tried[i])
            for j in range(max(0, k - coarse + 1), min(len(alphas), k + coarse)):
                if j not in tried:
                    tried[j] = loss_at(alphas[j])
    return tried


def alpha_grid(n: int) -> list[float]:
    """``n`` evenly spaced exponents in [0, 1) (AWQ's grid)."""
    return [i / n for i in range(n)]
