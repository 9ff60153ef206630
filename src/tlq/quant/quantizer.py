"""Integer quantization primitives: scales, zero points, codes, and fake quantization.

Pure tensor code. The integer convention is the one compressed-tensors stores (see ``tlq.config``):
signed codes in ``[qmin, qmax]``, ``dequant = (code - zero_point) * scale``; symmetric scales use the
half range ``max|w| / ((qmax - qmin) / 2)`` (the GPTQ convention, which uses the whole code range).
Matching the runtime's formulas exactly is what lets an exported checkpoint reproduce the logits
of the in-memory fake-quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tlq.config import ActQuantSpec, ConfigError, WeightQuantSpec


@dataclass
class QuantizedWeight:
    """The result of quantizing one ``[out, in]`` weight.

    ``scale`` and ``zero_point`` have shape ``[out, n_groups]`` (``n_groups == 1`` per channel);
    ``codes`` is int8 ``[out, in]`` in ``[spec.qmin, spec.qmax]``.
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    spec: WeightQuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.spec).to(dtype)


def group_size_of(in_features: int, spec: WeightQuantSpec) -> int:
    """The effective group length along the input dimension (``in_features`` when per channel)."""
    if spec.group_size is None:
        return in_features
    if in_features % spec.group_size != 0:
        raise ConfigError(
            f"group size {spec.group_size} does not divide the layer's {in_features} input features; "
            f"choose a divisor with --group-size, or per-channel scales with --group-size -1"
        )
    return spec.group_size


def compute_qparams(w: Tensor, spec: WeightQuantSpec, scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Min-max scales and zero points, one pair per (row, group) of ``w`` ``[out, in]``.

    ``w`` may also be a single group ``[out, g]``: the result is then ``[out, 1]``.
    ``scale_dtype`` rounds scales to the dtype they will be stored in, so codes computed from them
    dequantize to exactly what a reloaded checkpoint computes.
    """
    out_f, in_f = w.shape
    g = group_size_of(in_f, spec)
    wg = w.detach().float().reshape(out_f, in_f // g, g)
    wmin = wg.amin(dim=-1).clamp(max=0.0)
    wmax = wg.amax(dim=-1).clamp(min=0.0)
    qrange = float(spec.qmax - spec.qmin)
    if spec.symmetric:
        scale = torch.maximum(wmin.abs(), wmax) / (qrange / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (wmax - wmin) / qrange
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(spec.qmin - wmin / scale).clamp(spec.qmin, spec.qmax)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    # An all-zero group: any positive scale dequantizes its codes to 0; use compressed-tensors'
    # choice (the storage dtype's eps) so that our scales equal ``calculate_qparams``'s everywhere.
    eps = torch.finfo(scale_dtype or torch.float32).eps
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    return scale, zero.to(torch.int8)


def _expand(t: Tensor, in_features: int) -> Tensor:
    """Broadcast a ``[out, n_groups]`` parameter to ``[out, in]``."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def quantize_codes(w: Tensor, scale: Tensor, zero_point: Tensor, spec: WeightQuantSpec) -> Tensor:
    """Round ``w`` to integer codes with the given per-group parameters.

    ``round(w / scale + zero_point)``, the order compressed-tensors' ``quantize`` uses: adding the
    zero point *before* rounding matters for exact ties (``torch.round`` rounds half to even, so
    ``round(0.5 + 1) != round(0.5) + 1``), and identical codes are what make export a copy.
    """
    in_f = w.shape[1]
    q = torch.round(w.float() / _expand(scale, in_f) + _expand(zero_point, in_f).float())
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero_point: Tensor, spec: WeightQuantSpec) -> Tensor:
    in_f = codes.shape[1]
    return (codes.float() - _expand(zero_point, in_f).float()) * _expand(scale, in_f)


def fake_quantize_activation(x: Tensor, spec: ActQuantSpec) -> Tensor:
    """Dynamic per-token symmetric quantize-dequantize of ``x`` ``[..., features]``.

    Same formula as compressed-tensors' dynamic TOKEN strategy (scale = max|x| / (range / 2)),
    so calibration sees exactly what the reloaded checkpoint computes at inference.
    One scale per row of the last dimension: compressed-tensors' TOKEN strategy keeps dims 0 and 1,
    so it agrees for the ``[batch, seq, features]`` inputs a decoder's linears see (on a 2-D input it
    would reduce to one scale per tensor, which is not what a per-token kernel does).
    """
    qrange = float(spec.qmax - spec.qmin)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / (qrange / 2)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    return torch.clamp(torch.round(x / scale), spec.qmin, spec.qmax) * scale


def add_input_quantizer(module: torch.nn.Module, spec: ActQuantSpec) -> torch.utils.hooks.RemovableHandle:
    """Fake-quantize the input of ``module`` on every forward, as a W-A kernel would.

    A forward pre-hook keeps the module itself (names, weights) unchanged, so the same model object
    is calibrated, evaluated and exported.
    """

    def hook(_mod: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quantize_activation(args[0], spec),) + tuple(args[1:])

    return module.register_forward_pre_hook(hook)
