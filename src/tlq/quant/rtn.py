"""Round-to-nearest (RTN) weight quantization: the data-free baseline.

Min-max parameters per (output row, group) from ``compute_qparams``, then each weight is rounded to its
nearest code. It is also the reference every data-driven solver (GPTQ, scale search) must beat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tlq.config import WeightQuantSpec
from tlq.quant.quantizer import QuantizedWeight, compute_qparams, quantize_codes


def rtn_quantize(weight: Tensor, spec: WeightQuantSpec, scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` by round-to-nearest with min-max per-group parameters.

    ``scale_dtype`` rounds the scales to the dtype they will be stored in *before* the codes are
    computed, so the stored (codes, scales) reproduce this dequantized weight exactly after reload.
    Raises ``ConfigError`` when the group size does not divide ``in``.
    """
    if weight.ndim != 2:
        raise ValueError(f"rtn_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale, zero = compute_qparams(w, spec, scale_dtype)
    codes = quantize_codes(w, scale, zero, spec)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, spec=spec)


def rtn_fake_quantize(weight: Tensor, spec: WeightQuantSpec, scale_dtype: torch.dtype | None = None) -> Tensor:
    """``rtn_quantize(weight, ...).dequantize(weight.dtype)``, bit for bit, without the codes.

    Why: the scale search quantizes every candidate's weights only to read their values; working on a
    ``[out, groups, group]`` view broadcasts the per-group parameters instead of expanding them to the
    weight's shape, and skips the int8 round trip (the rounded, clamped floats *are* the codes' values),
    which made the quantize-dequantize a quarter of the search's time at real widths.
    """
    if weight.ndim != 2:
        raise ValueError(f"rtn_fake_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale, zero = compute_qparams(w, spec, scale_dtype)
    out_f, in_f = w.shape
    groups = scale.shape[1]
    s, z = scale.unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.round(w.reshape(out_f, groups, in_f // groups) / s + z).clamp_(spec.qmin, spec.qmax)
    return q.sub_(z).mul_(s).reshape(out_f, in_f).to(weight.dtype)
