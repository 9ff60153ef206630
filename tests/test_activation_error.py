"""benchmarks/activation_error.py: the weight-side and input-side output errors it reports."""

from __future__ import annotations

import math

import torch


def test_errors_separate_weights_from_inputs_and_smoothing_helps_an_outlier_channel(benchmark):
    bench = benchmark("activation_error")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g, dtype=torch.float64)
    x[:, 5] *= 40  # one input channel far above the rest, on every token
    linear = torch.nn.Linear(128, 32, bias=False)
    linear.weight.data = torch.randn(32, 128, generator=g)
    e = bench.relative_errors(x, linear)
    wide = torch.nn.Linear(128, 32, bias=False)
    wide.weight.data = linear.weight.data.clone()
    wide.weight.data[:, 9] *= 8  # an outlier weight column sets every row's int4 range
    assert 0 < e["w4"] < bench.relative_errors(x, wide)["w4"]
    assert e["a8"] < e["a4"]
    assert e["a4_smoothed"] < 0.5 * e["a4"]  # the per-channel scale moves the outlier into the weights
    assert 1 < e["peak_median"] <= e["peak_max"] <= math.sqrt(128)  # a token's peak is bounded by sqrt(width)
