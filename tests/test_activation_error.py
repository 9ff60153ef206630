"""benchmarks/activation_error.py: the weight-side and input-side output errors it reports."""

from __future__ import annotations

import math

import pytest
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


def test_summary_per_kind_takes_the_median_over_layers_and_the_largest_peak(benchmark):
    bench = benchmark("activation_error")
    rows = {
        f"{i}.mlp.down_proj": {"peak_median": float(i), "peak_max": 10.0 + i, "w4": 0.1 * i, "a4": 0.2, "a8": 0.01, "a4_smoothed": 0.1}
        for i in range(4)
    }
    rows["0.self_attn.o_proj"] = {"peak_median": 2.0, "peak_max": 3.0, "w4": 0.5, "a4": 0.3, "a8": 0.02, "a4_smoothed": 0.2}
    kinds = bench.by_kind(rows)
    assert list(kinds) == ["mlp.down_proj", "self_attn.o_proj"]
    assert kinds["mlp.down_proj"]["peak_median"] == 1.5 and kinds["mlp.down_proj"]["w4"] == pytest.approx(0.15)
    assert kinds["mlp.down_proj"]["peak_max"] == 13.0
    assert kinds["self_attn.o_proj"] == rows["0.self_attn.o_proj"]


def test_peak_split_separates_one_channel_tokens_from_flat_ones(benchmark):
    """A token whose one huge channel carries its output loses only that channel's clip to int4 per-token
    inputs; flat tokens lose more; the split says which tokens are which and how much each group weighs."""
    bench = benchmark("activation_error")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=g, dtype=torch.float64)
    x[:10] *= 0.01
    x[:10, 3] = 50.0  # ten tokens: everything in channel 3
    linear = torch.nn.Linear(256, 16, bias=False)
    assert bench.token_peaks(x)[:10].min() > 15 > bench.token_peaks(x)[10:].max()
    e = bench.peak_split(x, linear, 15)
    assert e["share_tokens"] == 0.25
    # the big channel sits at max / (max / 7.5) = 7.5 steps (compressed-tensors' scale), clipped to 7: it
    # loses 1/15 of itself, and the tiny channels round to zero; a flat token loses more
    assert abs(e["a4_above"] - 1 / 15) < 0.005 and e["a4_above"] < e["a4_rest"]
    assert 0 < e["share_error"] < e["share_output"] < 1
