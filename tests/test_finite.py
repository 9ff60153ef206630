"""NaN/Inf are caught where they arise and named: quantization algorithms and weight checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tlq.config import GPTQConfig, WeightQuantSpec
from tlq.quant.gptq import gptq_quantize
from tlq.quant.scale_search import ChannelStats, search_scales
from tlq.utils.finite import NonFiniteError, check_finite, check_weights


def test_check_finite_counts_and_names():
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    with pytest.raises(NonFiniteError, match=r"in layer 3 \(1 NaN, 2 Inf of 4\): fix it"):
        check_finite(t, "layer 3", "fix it")
    check_finite(torch.arange(3), "ints", "never raised")  # integer tensors are always finite


def test_weight_hint_tells_overflow_from_damage():
    inf_fp16 = [("w", torch.tensor([1.0, float("inf")], dtype=torch.float16))]
    with pytest.raises(NonFiniteError, match="tensor 'w'.*overflows float16.*bfloat16"):
        check_weights(inf_fp16, "/m", torch.float16)
    nan = [("ok", torch.ones(2)), ("bad", torch.tensor([float("nan")]))]
    with pytest.raises(NonFiniteError, match="tensor 'bad'.*checkpoint in /m is damaged"):
        check_weights(nan, "/m", torch.float32)


def test_gptq_refuses_a_non_finite_hessian_in_one_line():
    w = torch.randn(8, 16)
    h = torch.eye(16)
    h[3, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"GPTQ Hessian of a \(8, 16\) weight.*overflowed"):
        gptq_quantize(w, h, WeightQuantSpec(bits=4, group_size=None), GPTQConfig())


def test_scale_search_refuses_a_non_finite_baseline_but_skips_bad_candidates():
    torch.manual_seed(0)
    prev, lin = nn.LayerNorm(8), nn.Linear(8, 4)
    stats = ChannelStats(abs_mean=torch.rand(8) + 0.1, abs_max=torch.rand(8) + 1.0)
    with pytest.raises(NonFiniteError, match=r"non-finite scale-search loss without scaling \(nan\)"):
        search_scales("awq", prev, [lin], stats, [0.0, 0.5], lambda: float("nan"))
    losses = iter([1.0, float("nan"), 0.5])  # baseline, a candidate that overflowed, a good one
    result = search_scales("awq", prev, [lin], stats, [0.25, 0.5], lambda: next(losses))
    assert result.alpha == 0.5 and result.loss == 0.5
