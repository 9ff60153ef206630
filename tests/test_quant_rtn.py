"""RTN and the quantizer primitives, checked against compressed-tensors' own formulas.

Exact equality (not closeness) with compressed-tensors is the point: an exported checkpoint is a copy
of our codes and scales, so the reloaded model only reproduces the calibrated one if both sides compute
the very same numbers.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp

from tlq.config import ActQuantSpec, ConfigError, WeightQuantSpec
from tlq.quant.quantizer import compute_qparams, fake_quantize_activation, quantize_codes
from tlq.quant.rtn import rtn_fake_quantize, rtn_quantize

SPECS = [
    WeightQuantSpec(bits=4, group_size=128, symmetric=True),
    WeightQuantSpec(bits=3, group_size=128, symmetric=False),
    WeightQuantSpec(bits=4, group_size=None, symmetric=True),
    WeightQuantSpec(bits=8, group_size=None, symmetric=True),
    WeightQuantSpec(bits=2, group_size=64, symmetric=False),
]


def _weight(out_f: int = 48, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier weight, as real LLMs have
    w[5, :128] += 0.2  # a one-signed group (asymmetric min-max clamps its min to 0)
    return w


def _ct_args(spec: WeightQuantSpec, scale_dtype: torch.dtype | None = None) -> QuantizationArgs:
    strategy = "channel" if spec.group_size is None else "group"
    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy=strategy,
        group_size=spec.group_size,
        scale_dtype=scale_dtype,
    )


def _grouped(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    g = spec.group_size or w.shape[1]
    return w.reshape(w.shape[0], w.shape[1] // g, g)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_codes_int8_in_range_and_shapes(spec: WeightQuantSpec) -> None:
    w = _weight()
    qw = rtn_quantize(w, spec)
    n_groups = 1 if spec.group_size is None else w.shape[1] // spec.group_size
    assert qw.codes.dtype == torch.int8 and qw.codes.shape == w.shape
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    assert qw.scale.shape == (w.shape[0], n_groups) and qw.zero_point.shape == (w.shape[0], n_groups)
    assert bool((qw.scale > 0).all())
    assert int(qw.zero_point.min()) >= spec.qmin and int(qw.zero_point.max()) <= spec.qmax
    if spec.symmetric:
        assert bool((qw.zero_point == 0).all())
    else:  # asymmetric zero points really move (they would all be 0 if the asymmetric path were dead)
        assert bool((qw.zero_point != 0).any())
    # the full code range is used (min-max covers it)
    assert int(qw.codes.min()) == spec.qmin


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_error_within_half_step_except_clamped(spec: WeightQuantSpec) -> None:
    w = _weight(seed=1)
    qw = rtn_quantize(w, spec)
    deq = qw.dequantize()
    g = spec.group_size or w.shape[1]
    scale = qw.scale.repeat_interleave(g, dim=1)
    zero = qw.zero_point.float().repeat_interleave(g, dim=1)
    unclamped = torch.round(w / scale + zero)
    clamped = (unclamped < spec.qmin) | (unclamped > spec.qmax)
    err = (w.double() - deq.double()).abs().float()
    tol = 1e-5 * scale  # w / scale is rounded in float32: ~1 ulp of a value up to 2^(b-1)
    assert bool((err[~clamped] <= scale[~clamped] / 2 + tol[~clamped]).all())
    # min-max ranges only clip the extreme element by at most one step (e.g. +max -> 2^(b-1) in symmetric)
    assert bool((err[clamped] <= scale[clamped] + tol[clamped]).all())
    assert int(clamped.sum()) <= w.shape[0] * (w.shape[1] // g)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_codes_are_a_fixed_point_of_their_grid(spec: WeightQuantSpec) -> None:
    """Re-rounding the dequantized weight with the same parameters gives back the same codes."""
    w = _weight(seed=2)
    qw = rtn_quantize(w, spec)
    assert torch.equal(quantize_codes(qw.dequantize(), qw.scale, qw.zero_point, spec), qw.codes)


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
def test_rtn_bf16_scales_reproduce_dequant_exactly(spec: WeightQuantSpec) -> None:
    w = _weight(seed=3)
    qw = rtn_quantize(w, spec, scale_dtype=torch.bfloat16)
    stored = qw.scale.to(torch.bfloat16)
    assert torch.equal(stored.float(), qw.scale)  # nothing lost when the scale is stored in bf16
    # what a reloaded bf16 checkpoint computes: (code - zp) * scale in bf16 arithmetic
    g = spec.group_size or w.shape[1]
    reloaded = (qw.codes.to(torch.bfloat16) - qw.zero_point.to(torch.bfloat16).repeat_interleave(g, 1)) * stored.repeat_interleave(g, 1)
    assert torch.equal(reloaded, qw.dequantize(torch.bfloat16))
    # and rounding the scale after the fact would not be exact: the bf16 path genuinely differs
    assert not torch.equal(rtn_quantize(w, spec).scale, qw.scale)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [None, torch.bfloat16])
def test_fake_quantize_is_the_dequantized_rtn_weight_bit_for_bit(spec: WeightQuantSpec, dtype, scale_dtype) -> None:
    """The scale search's codes-free path gives exactly what quantize-then-dequantize gives (ties, the
    clamped outlier, the one-signed group and an all-zero group included)."""
    w = _weight(seed=5)
    w[7, 128:] = 0.0
    w[9, :64] = 0.5 * (torch.arange(64) % 2)  # values on a tie of the grid
    w = w.to(dtype)
    expected = rtn_quantize(w, spec, scale_dtype=scale_dtype).dequantize(dtype)
    got = rtn_fake_quantize(w, spec, scale_dtype=scale_dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
    assert not torch.equal(got, w)  # it did quantize


def test_group_size_must_divide_in_features() -> None:
    spec = WeightQuantSpec(bits=4, group_size=128, symmetric=True)
    with pytest.raises(ConfigError, match="does not divide"):
        rtn_quantize(torch.randn(8, 200), spec)


def test_rtn_rejects_non_matrix() -> None:
    with pytest.raises(ValueError):
        rtn_quantize(torch.randn(4, 8, 128), WeightQuantSpec())


# ---- parity with compressed-tensors -------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_compute_qparams_equals_compressed_tensors(spec: WeightQuantSpec, scale_dtype: torch.dtype | None) -> None:
    w = _weight(seed=4)
    if spec.symmetric:
        w[7, : spec.group_size or w.shape[1]] = 0.0  # an all-zero group: both sides must pick the same scale
    grouped = _grouped(w, spec)
    ct_scale, ct_zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), _ct_args(spec, scale_dtype))
    scale, zero = compute_qparams(w, spec, scale_dtype)
    assert torch.equal(scale, ct_scale.float())
    assert torch.equal(zero.to(torch.int32), torch.round(ct_zero.float()).to(torch.int32))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_dequant_equals_compressed_tensors_fake_quantize(spec: WeightQuantSpec) -> None:
    w = _weight(seed=5)
    qw = rtn_quantize(w, spec)
    ct_args = _ct_args(spec)
    zp = qw.zero_point if not spec.symmetric else torch.zeros_like(qw.zero_point)
    ct = fake_quantize(w, qw.scale, zp, ct_args)
    assert torch.equal(qw.dequantize(), ct)
    # the integer codes too (what pack-quantized stores, before its unsigned offset)
    ct_codes = quantize(w, qw.scale, zp, ct_args, dtype=torch.int8)
    assert torch.equal(qw.codes, ct_codes)


def test_quantize_codes_ties_follow_compressed_tensors() -> None:
    """Half-way values with an odd zero point: round(x/s + zp) and round(x/s) + zp differ (half to even)."""
    spec = WeightQuantSpec(bits=4, group_size=None, symmetric=False)
    w = torch.tensor([[0.5, 1.5, -0.5, 2.5, -1.5, 0.0, 3.0, -2.5]])
    scale = torch.ones(1, 1)
    zero = torch.tensor([[1]], dtype=torch.int8)
    ours = quantize_codes(w, scale, zero, spec)
    ct = quantize(w, scale, zero, _ct_args(spec), dtype=torch.int8)
    assert torch.equal(ours, ct)
    assert ours[0, 0] == 2  # round(1.5) = 2, whereas round(0.5) + 1 would give 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_quantize_activation_equals_compressed_tensors_dynamic_token(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 17, 64, generator=g) * torch.logspace(-2, 1, 64)).to(dtype)
    x[0, 3] = 0.0  # an all-zero token must not divide by zero
    x[1, 5, 9] = 40.0  # a massive activation in one token
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Identity())
    ct = fake_quantize(x, scale, zp, args)
    ours = fake_quantize_activation(x, ActQuantSpec(bits=8))
    assert ours.dtype == ct.dtype == dtype
    assert torch.equal(ours, ct)
    assert torch.equal(ours[0, 3], torch.zeros_like(ours[0, 3]))
    # per token: each token's error is bounded by half of its *own* step, so the massive activation
    # coarsens token [1, 5] only
    step = x.float().abs().amax(dim=-1, keepdim=True) / 127.5
    err = (ours.float() - x.float()).abs()
    ulp = torch.finfo(dtype).eps * x.float().abs()  # the dequantized value is rounded to dtype
    assert bool((err <= step / 2 * (1 + 1e-5) + ulp).all())
    assert float(step[1, 5]) > 3 * float(step[1, 4])
