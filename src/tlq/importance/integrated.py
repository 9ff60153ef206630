"""Token weights from integrated gradients of a layer's quantization error (QIG, arXiv 2603.17809).

The published alternative to TLQ's answer-loss gradients, for comparison on the same engine
(``QuantizeConfig.weighting = "integrated"``). Where TLQ asks "how much does an error at token ``t``
move the answer?", QIG asks "how much of this layer's weight-quantization error does token ``t`` drive?":

* ``F(x) = sum_t mean_h | L_fp(x)[t] - L_rtn(x)[t] |``: the layer's output error when every linear is
  rounded to nearest at the scheme's weight format, on the inputs ``x`` ``[seq, hidden]``;
* the integrated gradient of ``F`` from the all-zero input to ``x``,
  ``IG[t, h] = x[t, h] * mean_k dF/dx[t, h] (alpha_k x)``, over ``steps`` midpoints ``alpha_k`` of [0, 1]
  (the midpoint rule: QIG's own sum includes both ends; the midpoints integrate a smooth path more
  accurately with the same number of passes);
* the path is steep near the zero input: a decoder layer normalises its input, and the norm's epsilon
  only matters for ``alpha`` below ~``sqrt(eps) / rms(x)``. On a tiny test layer 64 points sum to 60% of
  ``F(x) - F(0)`` and 1,024 to within 2%; the default keeps QIG's 32 points, as the comparison is with
  QIG as published (``ImportanceConfig.ig_steps``);
* a token's raw importance is ``mean_h |IG[t, h]|``; per sample it is normalised, clipped to the
  interquartile fence ``[q1 - k iqr, q3 + k iqr]`` (QIG's ``k = 1.5``), and scaled to mean 1 over the
  sample's tokens, the convention of every other token weight here.

The answer never enters: the weights need no importance pass before calibration, and are computed in
each layer, on the inputs the layer is calibrated on (the quantized stream, by default), by the step
:func:`integrated_gradients_step`, which runs before the scale search. Every statistic of the layer (the
search's loss, GPTQ's Hessians) then uses them, as it would use TLQ's. Cost: ``3 * steps`` passes of one
layer (two forwards and one backward per midpoint) per sample and layer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from tlq.config import WeightQuantSpec
from tlq.engine.context import LayerContext, LayerState
from tlq.importance.gradients import frozen_parameters
from tlq.models.base import hook_free_copy, run_layer
from tlq.quant.rtn import rtn_fake_quantize


def rounded_copy(layer: nn.Module, spec: WeightQuantSpec, keep: Callable[[str], bool] = lambda _name: False) -> nn.Module:
    """A hook-free copy of ``layer`` with every linear's weight rounded to nearest at ``spec`` (those
    ``keep`` names stay as they are: the adapter's 16-bit modules)."""
    ref = hook_free_copy(layer)
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear) and not keep(name):
            m.weight.data = rtn_fake_quantize(m.weight.data, spec)
    return ref


def rounding_error(layer: nn.Module, rounded: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """``F(x)``: the layer's output error from rounding, ``sum_t mean_h |L_fp(x)[t] - L_rtn(x)[t]|``."""
    return (run_layer(layer, x, kwargs) - run_layer(rounded, x, kwargs)).float().abs().mean(-1).sum()


def integrated_gradients(layer: nn.Module, rounded: nn.Module, x: Tensor, kwargs: dict[str, Any], steps: int) -> Tensor:
    """``IG`` (float32, the shape of ``x``: ``[1, seq, hidden]``), the path integral from the zero input
    to ``x``: its sum is ``F(x) - F(0)`` up to the midpoint rule's error (completeness)."""
    total = torch.zeros_like(x, dtype=torch.float32)
    with torch.enable_grad(), frozen_parameters(layer), frozen_parameters(rounded):
        for k in range(steps):
            xi = (x.detach() * ((k + 0.5) / steps)).requires_grad_(True)
            (grad,) = torch.autograd.grad(rounding_error(layer, rounded, xi, kwargs), xi)
            total += grad.float()
    return x.float() * total / steps


def interquartile_weights(raw: Tensor, fence: float) -> Tensor:
    """``raw`` ``[seq]`` normalised, clipped to ``[q1 - fence iqr, q3 + fence iqr]`` and scaled to mean 1.
    A row without any attribution (all zeros) becomes uniform: nothing says which token to favour."""
    raw = raw.float()
    total = raw.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.ones_like(raw)
    w = raw / total
    q1, q3 = torch.quantile(w, torch.tensor([0.25, 0.75], dtype=w.dtype))
    iqr = q3 - q1
    w = w.clamp(min=float(q1 - fence * iqr), max=float(q3 + fence * iqr))
    return w / w.mean().clamp(min=1e-30)


def integrated_gradients_step(ctx: LayerContext, state: LayerState) -> None:
    """The step: this layer's token weights from integrated gradients, installed for the steps after it
    (``ctx.token_weights``, keyed by global sample id; every linear of the layer gets the same weights)."""
    imp = ctx.config.importance
    rounded = rounded_copy(ctx.layer, ctx.config.scheme.weights, lambda n: ctx.adapter.keeps_16bit(f"{ctx.prefix}.{n}"))
    weights: dict[int, Tensor] = {}
    for s, (x, kw) in enumerate(zip(state.inputs(ctx.config), ctx.kwargs)):
        raw = integrated_gradients(ctx.layer, rounded, ctx.dev(x), ctx.dev(kw), imp.ig_steps).abs().mean(-1).reshape(-1)
        weights[ctx.sample_ids[s]] = interquartile_weights(raw.cpu(), imp.ig_fence)
    del rounded
    index = ctx.index

    def fn(layer: int, sample: int, linear: str | None = None) -> Tensor:
        if layer != index:
            raise IndexError(f"integrated-gradient weights were computed for layer {index}, layer {layer} was asked for")
        return weights[sample]

    ctx.token_weights = fn
