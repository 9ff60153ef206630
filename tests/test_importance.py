"""Token importance: layer-wise gradients, robust weights, the token-level calibration set, reports."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from tlq.api import build_config, load_model
from tlq.config import ConfigError
from tlq.data.calibration import load_calibration
from tlq.engine.layerwise import LayerwiseEngine
from tlq.importance import (
    ImportanceConfig,
    SelectionConfig,
    TokenCalibrationSet,
    build_token_calibration_set,
    integrate,
    layerwise_token_gradients,
    run_importance,
    select_tokens,
)
from tlq.importance.calibset import inclusion_probabilities, sample_tokens, sample_tokens_coupled
from tlq.importance.gradients import softmax_curvature
from tlq.importance.weights import sample_factors
from tlq.models.base import get_submodule, grid_boxes
from tlq.models.tiny import FAMILIES


def _setup(tiny_vlm_dir, tiny_calib_jsonl, family="qwen2_vl", n=2):
    adapter, model, processor, _dir, _dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=n, max_seq_len=4096, seed=0)
    return adapter, model, processor, samples


def _full_backprop_grad2(adapter, model, sample):
    """||dL/dh_l||^2 per layer output by ordinary back-propagation through the whole model."""
    layers = adapter.decoder_layers(model)
    norm = get_submodule(model, adapter.spec.final_norm)
    last: dict[str, torch.Tensor] = {}

    def keep_last(_m, args):
        # the final norm's input: the last layer's output after whatever the model adds between layers
        args[0].retain_grad()
        last["h"] = args[0]

    handle = norm.register_forward_pre_hook(keep_last)
    try:
        with torch.enable_grad():
            out = model(**sample.inputs, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hs = out.hidden_states
    # transformers: hidden_states = (embeddings, layer 0 out, ..., layer L-2 out, final_norm(layer L-1 out)):
    # the last entry is after the final norm, so the last layer's output comes from the hook. (Qwen3-VL
    # records each layer's output before its DeepStack addition, a constant: the gradient is the same.)
    assert len(hs) == len(layers) + 1
    torch.testing.assert_close(hs[-1], norm(last["h"]))
    outs = [hs[i + 1] for i in range(len(layers) - 1)] + [last["h"]]
    for h in outs[:-1]:
        h.retain_grad()
    ids = sample.inputs["input_ids"][0]
    tgt = sample.answer_mask.nonzero().reshape(-1)
    tgt = tgt[tgt > 0]
    loss = torch.nn.functional.cross_entropy(out.logits[0, tgt - 1].float(), ids[tgt])
    loss.backward()
    grads = torch.stack([h.grad[0].pow(2).sum(-1) for h in outs]).detach()
    model.zero_grad(set_to_none=True)
    return grads, float(loss.detach())


# --- the layer-wise importance pass -------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_gradients_equal_full_backprop(tiny_vlm_dir, tiny_calib_jsonl, family):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, family)
    sample = samples[1]
    ref, ref_loss = _full_backprop_grad2(adapter, model, sample)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tg = layerwise_token_gradients(adapter, model, sample)
    assert tg.grad.dtype == torch.float32 and tg.grad.device.type == "cpu"
    assert tg.grad.shape == (len(adapter.decoder_layers(model)), sample.seq_len)
    assert tg.loss == pytest.approx(ref_loss, rel=1e-6)
    assert tg.num_answer_tokens == int(sample.answer_mask[1:].sum())
    torch.testing.assert_close(tg.grad, ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
    # ||g|| option, parameters untouched (flags restored, no .grad accumulated)
    plain = layerwise_token_gradients(adapter, model, sample, squared=False)
    torch.testing.assert_close(plain.grad, ref.sqrt(), rtol=1e-5, atol=1e-6)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert (tg.grad[0, sample.visual_mask] > 0).all()  # the answer depends on every image token


def test_gradients_vanish_where_causality_says(tiny_vlm_dir, tiny_calib_jsonl):
    """With only the first answer token in the loss, no layer's output at or after its position can
    change the loss (causal attention, and the logits at t-1 predict t): those gradients are exactly 0;
    at the last layer only the predicting position itself has a gradient."""
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl")
    sample = samples[0]
    first = int(sample.answer_mask.nonzero()[0])
    one = replace(sample, answer_mask=torch.zeros_like(sample.answer_mask))
    one.answer_mask[first] = True
    g = layerwise_token_gradients(adapter, model, one).grad
    assert torch.all(g[:, first:] == 0)
    assert torch.all(g[:, first - 1] > 0)
    assert torch.all(g[:-1, : first - 1].sum(-1) > 0)  # earlier tokens matter through attention
    assert torch.all(g[-1, : first - 1] == 0) and torch.all(g[-1, first:] == 0)
    # the full answer: nothing at or after the last answer token matters
    last = int(sample.answer_mask.nonzero()[-1])
    assert torch.all(layerwise_token_gradients(adapter, model, sample).grad[:, last:] == 0)


def test_sample_without_answer_gets_zero_gradients(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", n=1)
    empty = replace(samples[0], answer_mask=torch.zeros_like(samples[0].answer_mask))
    with pytest.warns(UserWarning, match="no answer token"):
        tg = layerwise_token_gradients(adapter, model, empty)
    assert torch.all(tg.grad == 0) and tg.num_answer_tokens == 0 and math.isnan(tg.loss)
    assert torch.all(integrate(tg.grad, empty.visual_mask) == 1)  # no information: uniform


# --- integration into weights -------------------------------------------------------------------
def _raw(num_layers=3, seq=400, n_vis=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(num_layers, seq, generator=g).pow(8) * torch.logspace(-2, 2, num_layers)[:, None]
    raw[:, :n_vis] *= 0.01  # visual tokens: mostly tiny gradients
    raw[:, 5] = 0.0  # a dead token
    raw[1, seq - 50] = 1e4  # one outlier
    visual = torch.zeros(seq, dtype=torch.bool)
    visual[:n_vis] = True
    return raw, visual


def test_integrate_uniform_and_modality():
    raw, visual = _raw()
    assert torch.equal(integrate(raw, visual, ImportanceConfig(kind="uniform")), torch.ones_like(raw))
    w = integrate(raw, visual, ImportanceConfig(kind="modality"))
    for m in (visual, ~visual):
        assert torch.allclose(w[:, m], w[:, m][:, :1].expand(-1, int(m.sum())))
    torch.testing.assert_close(w.mean(-1), torch.ones(raw.shape[0]))
    # MBQ's weighting: the ratio of the two constants is the ratio of the modality means of ||g||^2
    ratio = raw[:, visual].mean(-1) / raw[:, ~visual].mean(-1)
    no_floor = integrate(raw, visual, ImportanceConfig(kind="modality", floor=0.0))
    torch.testing.assert_close(no_floor[:, 0] / no_floor[:, -1], ratio)


def test_integrate_bounds_and_normalisation():
    raw, visual = _raw()
    cfg = ImportanceConfig()
    w = integrate(raw, visual, cfg)
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.mean(-1), torch.ones(raw.shape[0]))  # mean 1 per sample, per layer
    assert (w.min(-1).values >= cfg.floor * w.mean(-1) - 1e-6).all()  # the floor, dead token included
    assert (w[:, 5] > 0).all()
    # clipping at the q-quantile bounds max/mean by ~1/(1-q); without it one token owns the row
    bare = dict(floor=0.0, modality_mix=0.0)
    clipped = integrate(raw, visual, ImportanceConfig(clip_quantile=0.9, **bare))
    unclipped = integrate(raw, visual, ImportanceConfig(clip_quantile=None, **bare))
    assert (clipped.max(-1).values / clipped.mean(-1) <= 1 / (1 - 0.9) + 1e-4).all()
    assert float(unclipped[1].max() / unclipped[1].mean()) > 300
    # mixing: lam * modality mean + (1 - lam) * token, row means unchanged
    mixed = integrate(raw, visual, ImportanceConfig(clip_quantile=None, floor=0.0, modality_mix=0.5))
    for m in (visual, ~visual):
        expect = 0.5 * unclipped[:, m].mean(-1, keepdim=True) + 0.5 * unclipped[:, m]
        torch.testing.assert_close(mixed[:, m], expect)
    # |g| kind, one weight per token
    g1 = integrate(raw, visual, ImportanceConfig(kind="grad", clip_quantile=None, **bare))
    torch.testing.assert_close(g1, raw.sqrt() / raw.sqrt().mean(-1, keepdim=True))
    glob = integrate(raw, visual, ImportanceConfig(per_layer=False))
    assert torch.equal(glob[0], glob[1]) and torch.equal(glob[0], glob[2])


def test_integrate_edge_cases():
    raw, visual = _raw(seq=50, n_vis=30)
    raw[0, 7] = float("nan")
    raw[2, 8] = float("inf")
    valid = torch.ones(50, dtype=torch.bool)
    valid[-4:] = False  # padding
    w = integrate(raw, visual, ImportanceConfig(), valid_mask=valid)
    assert torch.isfinite(w).all() and torch.all(w[:, -4:] == 0)
    torch.testing.assert_close(w[:, :-4].mean(-1), torch.ones(3))
    with pytest.raises(ConfigError, match="kind"):
        ImportanceConfig(kind="hessian")
    with pytest.raises(ConfigError):
        ImportanceConfig(clip_quantile=1.5)


# --- token-level calibration set ----------------------------------------------------------------
def test_selection_budget_min_share_and_top_k():
    seq, n_vis = 200, 150
    g = torch.Generator().manual_seed(1)
    w = torch.rand(2, seq, generator=g)
    w[:, :n_vis] *= 0.01  # visual tokens all below every text token
    w[1, n_vis:] *= 0.01  # layer 1: the reverse
    w[1, :n_vis] *= 1000
    visual = torch.zeros(seq, dtype=torch.bool)
    visual[:n_vis] = True
    cfg = SelectionConfig(token_fraction=0.2, min_modality_share=0.1, token_floor=0)
    sel = select_tokens(w, visual, cfg)
    k, quota = 40, 4
    assert ((sel > 0).sum(-1) == k).all()  # the budget
    assert int((sel[0, visual] > 0).sum()) == quota  # the weak modality keeps its minimum share...
    assert int((sel[1, ~visual] > 0).sum()) == quota
    for row, m in ((0, visual), (1, ~visual)):  # ... by its own top tokens, the rest by global top-k
        picked = (sel[row] > 0) & m
        assert set(picked.nonzero().reshape(-1).tolist()) == set(torch.where(m, w[row], -1.0).topk(quota).indices.tolist())
        others = (sel[row] > 0) & ~m
        assert set(others.nonzero().reshape(-1).tolist()) == set(torch.where(~m, w[row], -1.0).topk(k - quota).indices.tolist())
    assert torch.equal(sel[sel > 0], w[sel > 0])  # selected tokens keep their weights
    # no minimum share: plain top-k; absolute budget; everything kept at fraction 1
    plain = select_tokens(w, visual, SelectionConfig(token_fraction=0.2, min_modality_share=0.0, token_floor=0))
    assert set((plain[0] > 0).nonzero().reshape(-1).tolist()) == set(w[0].topk(k).indices.tolist())
    assert ((select_tokens(w, visual, SelectionConfig(token_count=17, token_floor=0)) > 0).sum(-1) == 17).all()
    assert torch.equal(select_tokens(w, visual, SelectionConfig(token_fraction=1.0)), w)


def test_token_floor_keeps_a_small_set_whole_and_is_global():
    cfg = SelectionConfig(token_fraction=0.5, token_floor=100)
    assert cfg.budget(40, total_valid=80) == 40  # the whole set is under the floor: every token
    assert cfg.budget(40, total_valid=160) == 25  # ceil(40 * 100 / 160): the sample's share of the floor
    assert cfg.budget(40, total_valid=400) == 20  # the floor is below the fraction's budget: no change
    assert SelectionConfig(token_count=5, token_floor=100).budget(40, total_valid=160) == 25
    with pytest.raises(ConfigError, match="token_floor"):
        SelectionConfig(token_floor=-1)
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(2, n, generator=g) for n in (30, 50, 40)]
    visual = [torch.arange(n) < n // 2 for n in (30, 50, 40)]
    whole = TokenCalibrationSet.select(weights, visual, SelectionConfig(token_floor=90))
    kept = [int((w[0] > 0).sum()) for w in whole.weights]
    assert kept == [23, 38, 30] and sum(kept) >= 90  # 120 tokens: 75% each rather than 50%
    # A rank holding samples 1 and 2 selects exactly as the single process does, given the set's total.
    shard = TokenCalibrationSet.select(weights[1:], visual[1:], SelectionConfig(token_floor=90), sample_ids=[1, 2], total_valid=120)
    assert all(torch.equal(a, b) for a, b in zip(shard.weights, whole.weights[1:]))
    local = TokenCalibrationSet.select(weights[1:], visual[1:], SelectionConfig(token_floor=90), sample_ids=[1, 2])
    assert [int((w[0] > 0).sum()) for w in local.weights] == [50, 40]  # its own 90 tokens are all under the floor
    assert torch.equal(TokenCalibrationSet.select(weights, visual, SelectionConfig(token_floor=120)).weights[1], weights[1])


def test_pipeline_floors_the_budget_on_the_all_ranks_token_count(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch):
    from tlq import pipeline

    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", n=2)
    total = sum(s.seq_len for s in samples)
    cfg = build_config("w4a16", "tlq", token_floor=total)

    def selected(tcs: TokenCalibrationSet) -> int:
        return sum(int((w.reshape(-1, w.shape[-1])[0] > 0).sum()) for w in tcs.weights)  # layer 0's first row

    assert selected(pipeline.token_calibration_set(adapter, model, samples, cfg, torch.device("cpu"), False)) == total
    # Another rank holds as many tokens again: the floor is half the set, so each sample keeps its half.
    monkeypatch.setattr(pipeline, "all_reduce_scalar_sum", lambda x: 2 * x)
    assert selected(pipeline.token_calibration_set(adapter, model, samples, cfg, torch.device("cpu"), False)) == sum(round(s.seq_len / 2) for s in samples)


def test_softmax_curvature_is_the_trace_of_the_kl_hessian():
    """1 - sum p^2 is the trace of d^2 KL(softmax(z) || softmax(z + d)) / dd^2 at d = 0: how much a small
    logit error moves the answer's distribution."""
    z = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    traces = []
    for row in z:
        p = row.softmax(-1)
        kl = lambda d, p=p, row=row: (p * (p.log() - (row + d).log_softmax(-1))).sum()  # noqa: E731
        traces.append(float(torch.autograd.functional.hessian(kl, torch.zeros(7, dtype=torch.float64)).trace()))
    assert softmax_curvature(z) == pytest.approx(sum(traces) / 3, rel=1e-9)
    assert softmax_curvature(torch.tensor([[30.0, 0.0, 0.0]])) < 1e-12  # a sure answer: no error moves it
    assert softmax_curvature(torch.zeros(1, 4)) == pytest.approx(0.75)  # uniform over 4: 1 - 1/4


def test_importance_pass_reports_the_answers_curvature(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", n=2)
    for s in samples:
        g = layerwise_token_gradients(adapter, model, s)
        with torch.no_grad():
            logits = model(**s.inputs).logits[0].float()
        at = s.answer_mask.nonzero().reshape(-1)
        p = logits[at[at > 0] - 1].softmax(-1)
        assert g.curvature == pytest.approx(float((1 - p.pow(2).sum(-1)).mean()), rel=1e-4)


def test_sample_factors_follow_the_curvature_with_a_floor_and_a_set_wide_mean():
    assert sample_factors([0.1, 0.3], 0.1) == pytest.approx([0.5, 1.5])
    assert sample_factors([0.0, 0.2, float("nan")], 0.1) == pytest.approx([0.1, 3.0, 0.1])  # no answer: the floor
    assert sample_factors([0.0, 0.0], 0.1) == [1.0, 1.0]  # all sure: no preference
    # One rank of two: the mean is the set's (the other rank holds a sample at 0.5), not this rank's.
    other = lambda xs: [xs[0] + 0.5, xs[1] + 1.0]  # noqa: E731
    assert sample_factors([0.1, 0.3], 0.1, other) == pytest.approx([0.1 / 0.3, 1.0])


def test_curvature_sample_weights_scale_each_sample_and_keep_its_tokens(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", n=2)
    # A random tiny model is about as unsure of every answer; give the two samples different curvatures.
    grads = [replace(layerwise_token_gradients(adapter, model, s, at="linear"), curvature=c) for s, c in zip(samples, (0.1, 0.3))]
    sel = SelectionConfig(token_floor=0)
    equal = build_token_calibration_set(adapter, model, samples, ImportanceConfig(grad_at="linear"), sel, gradients=grads)
    curved = build_token_calibration_set(adapter, model, samples, ImportanceConfig(grad_at="linear", sample_weights="curvature"), sel, gradients=grads)
    for e, c, f in zip(equal.weights, curved.weights, (0.5, 1.5)):
        torch.testing.assert_close(c, e * f)
        assert torch.equal(c > 0, e > 0)  # the token-level set keeps the same tokens
    with pytest.raises(ValueError, match="uniform"):
        build_token_calibration_set(adapter, model, samples, ImportanceConfig(kind="uniform", sample_weights="curvature"), sel)


def test_sample_weights_are_refused_where_no_importance_pass_runs():
    with pytest.raises(ConfigError, match="--sample-weights equal"):
        build_config("w4a16", "gptq", sample_weights="curvature").layer_steps()
    with pytest.raises(ConfigError, match="--sample-weights equal"):
        build_config("w4a16", "tlq", weighting="integrated", token_select=False, sample_weights="curvature").layer_steps()
    assert build_config("w4a16", "mbq", sample_weights="curvature").layer_steps() == ("scale_search", "solve")
    with pytest.raises(ConfigError, match="sample weights"):
        ImportanceConfig(sample_weights="loss")
    with pytest.raises(ConfigError, match="sample_floor"):
        ImportanceConfig(sample_floor=1.5)


def test_random_rank_keeps_a_seeded_subset_of_the_same_size_whatever_the_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(3, 200, generator=g)
    visual = torch.arange(200) < 150
    cfg = SelectionConfig(token_fraction=0.25, token_floor=0, rank="random")
    pick = lambda weights, seed=0: select_tokens(weights, visual, cfg, generator=torch.Generator().manual_seed(seed)) > 0  # noqa: E731
    chosen = pick(w)
    assert chosen.sum(-1).tolist() == [50, 50, 50] and torch.equal(chosen[0], chosen[2])  # one subset for every row
    assert torch.equal(pick(w.flip(-1)), chosen)  # the weights do not choose it
    assert torch.equal(pick(w), chosen) and not torch.equal(pick(w, seed=1), chosen)  # seeded per sample
    assert int(chosen[0, 150:].sum()) >= 5  # text keeps its reserved share of the budget
    by_weight = select_tokens(w, visual, replace(cfg, rank="importance"), generator=torch.Generator().manual_seed(0)) > 0
    assert not torch.equal(by_weight, chosen)
    kept = select_tokens(w, visual, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept[chosen], w[chosen])  # the kept tokens keep their weights
    with pytest.raises(ConfigError, match="token rank"):
        SelectionConfig(rank="loss")


def test_inclusion_probabilities_fill_the_budget_in_proportion_capped_at_one():
    w = torch.tensor([[10.0, 1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 2.0, 0.0, 0.0, 0.0]])
    pi = inclusion_probabilities(w, 3)
    # row 0: the heavy token is certain, the other 2 places spread over four equal tokens; row 1 has 3 weighted tokens
    torch.testing.assert_close(pi, torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.5, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(inclusion_probabilities(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2), torch.tensor([[0.2, 0.4, 0.6, 0.8]], dtype=torch.float64))


def test_sampled_tokens_are_an_unbiased_estimate_of_the_whole_weighted_set():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 40, generator=g).pow(3) * 10 + 0.05  # skewed: a few heavy tokens, many light ones
    w[0, :2] = 60.0  # and two heavy enough to be certain
    draws = sample_tokens(w.expand(40_000, -1), 8, torch.Generator().manual_seed(1))  # each row is one draw
    assert ((draws > 0).sum(-1) == 8).all()  # exactly the budget, every draw
    pi = inclusion_probabilities(w, 8)[0]
    assert int((pi >= 1).sum()) == 2
    assert torch.equal((draws[:, pi >= 1] > 0).all(0), torch.ones(int((pi >= 1).sum()), dtype=torch.bool))  # certain tokens always kept
    light = draws[:, pi < 1]
    assert torch.allclose(light[light > 0], light[light > 0][0])  # every uncapped token drawn weighs 1 / c
    # E[kept weight] = weight for every token: each token's mean over the draws within 4.5 of its standard errors
    # (a token drawn with chance pi has variance w^2 (1 - pi) / pi per draw); top-k would miss the light ones by 100%
    se = (w[0].double() ** 2 * (1 - pi) / pi / draws.shape[0]).sqrt().clamp(min=1e-12)
    assert ((draws.double().mean(0) - w[0]).abs() / se).max() < 4.5
    # through select_tokens: the same budget as the top-k set, seeded per sample
    cfg = SelectionConfig(token_fraction=0.2, token_floor=0, rank="sampled")
    visual = torch.arange(40) < 30
    a = select_tokens(w, visual, cfg, generator=torch.Generator().manual_seed(3))
    assert int((a > 0).sum()) == 8 and torch.equal(a, select_tokens(w, visual, cfg, generator=torch.Generator().manual_seed(3)))
    # a rank holding samples 1 and 2 draws exactly what the single process draws for them
    ws = [torch.rand(2, n, generator=g) + 0.01 for n in (30, 50, 40)]
    vis = [torch.arange(n) < n // 2 for n in (30, 50, 40)]
    whole = TokenCalibrationSet.select(ws, vis, cfg)
    shard = TokenCalibrationSet.select(ws[1:], vis[1:], cfg, sample_ids=[1, 2])
    assert all(torch.equal(x, y) for x, y in zip(shard.weights, whole.weights[1:]))


def test_coupled_rows_draw_as_unbiased_and_overlap_as_much_as_their_chances_allow():
    """rank='coupled': each row keeps a token with exactly its chance (so its kept weights are unbiased), a
    token kept by a row is kept by every row of its layer where its chance is higher, and a layer's union of
    kept rows is far smaller than when its rows draw on their own."""
    g = torch.Generator().manual_seed(0)
    # one layer, three weight rows that agree on the heavy tokens but not exactly (as a layer's linears do)
    w = (torch.rand(1, 1, 40, generator=g).pow(3) * 10 + 0.05) * (0.5 + torch.rand(1, 3, 40, generator=g))
    w[0, 0, :2] = 60.0  # two tokens certain in row 0
    draws = sample_tokens_coupled(w.expand(20_000, -1, -1), 8, torch.Generator().manual_seed(1))  # each layer is one draw
    pi = inclusion_probabilities(w[0], 8)
    kept = draws > 0
    # unbiased: every token's mean kept weight within 4.5 standard errors of its weight, in every row
    se = (w[0].double() ** 2 * (1 - pi) / pi / draws.shape[0]).sqrt().clamp(min=1e-12)
    assert ((draws.double().mean(0) - w[0]).abs() / se).max() < 4.5
    assert kept[:, 0, :2].all()  # certain tokens always kept
    assert abs(kept.sum(-1).double().mean() - 8) < 0.05  # the budget on average (Poisson: the size varies)
    assert kept.sum(-1).double().std() > 0.5
    # monotone: where row a's chance is at most row b's, a kept token of row a is kept by row b
    for a in range(3):
        for b in range(3):
            below = pi[a] <= pi[b]
            assert not (kept[:, a] & ~kept[:, b])[:, below].any()
    # the union: sum over tokens of the highest chance, against independent systematic draws of the same rows
    union = kept.any(1).sum(-1).double().mean()
    assert abs(union - pi.max(0).values.sum()) < 0.1
    alone = sample_tokens(w[0].repeat(2_000, 1), 8, torch.Generator().manual_seed(2)).reshape(2_000, 3, 40) > 0
    assert union < 0.8 * alone.any(1).sum(-1).double().mean()
    # through select_tokens: per-linear [L, R, seq] weights and plain [L, seq] ones, seeded per sample
    cfg = SelectionConfig(token_fraction=0.2, token_floor=0, rank="coupled")
    visual = torch.arange(40) < 30
    two_layers = torch.cat([w, w.flip(-1)])
    a = select_tokens(two_layers, visual, cfg, generator=torch.Generator().manual_seed(3))
    assert a.shape == two_layers.shape and torch.equal(a, select_tokens(two_layers, visual, cfg, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a[0] > 0, a[1].flip(-1) > 0)  # layers draw on their own
    assert select_tokens(w[0], visual, cfg, generator=torch.Generator().manual_seed(3)).shape == (3, 40)
    # a rank holding samples 1 and 2 draws exactly what the single process draws for them
    ws = [torch.rand(2, 3, n, generator=g) + 0.01 for n in (30, 50, 40)]
    vis = [torch.arange(n) < n // 2 for n in (30, 50, 40)]
    whole = TokenCalibrationSet.select(ws, vis, cfg, linear_names=("q", "k"))
    shard = TokenCalibrationSet.select(ws[1:], vis[1:], cfg, sample_ids=[1, 2], linear_names=("q", "k"))
    assert all(torch.equal(x, y) for x, y in zip(shard.weights, whole.weights[1:]))


def test_selection_ties_are_random_but_seeded():
    w, visual = torch.ones(1, 100), torch.zeros(100, dtype=torch.bool)
    a = select_tokens(w, visual, SelectionConfig(token_floor=0), generator=torch.Generator().manual_seed(0))
    b = select_tokens(w, visual, SelectionConfig(token_floor=0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int((a > 0).sum()) == 50
    assert int((a[0, :50] > 0).sum()) < 50  # not simply the first half of the sequence


def test_calibration_set_feeds_the_engine(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", n=3)
    tcs = build_token_calibration_set(adapter, model, samples, ImportanceConfig(), SelectionConfig(token_fraction=0.5, token_floor=0))
    assert isinstance(tcs, TokenCalibrationSet)
    assert tcs.num_samples == 3 and tcs.num_layers == len(adapter.decoder_layers(model))
    fn = tcs.weight_fn()
    for s, sample in enumerate(samples):
        for layer in range(tcs.num_layers):
            w = fn(layer, s)
            assert w.shape == (sample.seq_len,) and int((w > 0).sum()) == round(0.5 * sample.seq_len)
            assert (w[sample.visual_mask] > 0).any() and (w[~sample.visual_mask] > 0).any()
    with pytest.raises(IndexError):
        fn(tcs.num_layers, 0)
    # the weights before the budget are kept only when asked (a model with routed experts): every token weighted
    assert tcs.unbudgeted is None and torch.equal(fn(0, 0, every_token=True), fn(0, 0))
    routed = build_token_calibration_set(adapter, model, samples, ImportanceConfig(), SelectionConfig(token_fraction=0.5, token_floor=0), keep_unbudgeted=True)
    every = routed.weight_fn()(1, 0, every_token=True)
    assert (every > 0).all() and torch.equal(routed.weight_fn()(1, 0), fn(1, 0))
    assert torch.allclose(every[fn(1, 0) > 0], fn(1, 0)[fn(1, 0) > 0])  # the ranked set keeps its tokens' weights as they are
    summ = tcs.summary()
    counts = summ["selected_tokens_per_layer"]
    assert [v + t for v, t in zip(counts["visual"], counts["text"])] == [sum(round(0.5 * s.seq_len) for s in samples)] * tcs.num_layers
    share = summ["visual_weight_share_per_layer"]
    expect = sum(float(w[0][s.visual_mask].sum()) for w, s in zip(tcs.weights, samples)) / sum(float(w[0].sum()) for w in tcs.weights)
    assert share[0] == pytest.approx(expect)
    json.dumps(summ)
    # the engine accepts it (tokens with weight 0 are left out of the Hessians)
    engine = LayerwiseEngine(adapter, model, build_config("w4a16", "gptq"), torch.device("cpu"), token_weights=fn, progress=False)
    result = engine.calibrate(samples)
    assert len(result.layers) == tcs.num_layers and all(math.isfinite(r.rel_error) for r in result.layers)


# --- visual token grid and the report -----------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_visual_token_grid(tiny_vlm_dir, tiny_calib_jsonl, family):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, family, n=6)
    wide = samples[4]  # 84x56 (WxH); Qwen3-VL resizes it to 96x64: 6x4 patches of 16 px, the same 3x2 merged grid
    rows, cols = adapter.visual_token_grid(model, wide.inputs)
    if family != "llava_onevision":
        assert (rows, cols) == (2, 3) and rows * cols == int(wide.visual_mask.sum())
    else:  # the base tile: (56 / 14)^2 tokens, before the anyres tiles
        assert (rows, cols) == (4, 4) and rows * cols < int(wide.visual_mask.sum())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_visual_token_boxes_cover_every_visual_token_the_model_packs(tiny_vlm_dir, tiny_calib_jsonl, family):
    """One box (or row separator) per visual token, for every image size and aspect ratio in the set;
    LLaVA-OneVision: the base tile's grid, then the unpadded anyres grid with a separator per row —
    also when ``anyres_max`` pools it (the processor then makes fewer tokens, and so must the layout)."""
    adapter, model, processor, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, family, n=6)
    for s in samples:
        boxes = adapter.visual_token_boxes(model, s.inputs)
        assert len(boxes) == int(s.visual_mask.sum())
        regions = [b for b in boxes if b is not None]
        assert all(0 <= b[0] < b[2] <= 1 + 1e-9 and 0 <= b[1] < b[3] <= 1 + 1e-9 for b in regions)
    if family != "llava_onevision":
        return
    # 84x56 (WxH): the 56x112 (HxW) pinpoint, two tiles side by side = a 4x8 grid; the image fills 84 of
    # its 112 px width, so unpadding keeps 6 of 8 columns: 4 rows of 6 tokens, each row then a separator
    boxes = adapter.visual_token_boxes(model, samples[4].inputs)
    assert boxes[:16] == grid_boxes(4, 4)
    seps = [i for i, b in enumerate(boxes) if b is None]
    assert seps == [16 + 7 * k + 6 for k in range(4)] and boxes[16:22] == grid_boxes(4, 6)[:6]
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"  # pool above 1 tile's worth
    (pooled,) = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=6, max_seq_len=4096, seed=0)[4:5]
    boxes = adapter.visual_token_boxes(model, pooled.inputs)
    assert len(boxes) == int(pooled.visual_mask.sum()) < int(samples[4].visual_mask.sum())


def test_run_importance_writes_report(tiny_vlm_dir, tiny_calib_jsonl, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "imp"
    summary = run_importance(tiny_vlm_dir("llava_onevision"), tiny_calib_jsonl, out, num_samples=3, max_seq_len=4096, cfg=ImportanceConfig(), device="cpu", selection=SelectionConfig())
    assert sorted(p.name for p in out.iterdir()) == [".tlq-output.json", "importance.json", "importance.safetensors", "sample_000.png", "sample_001.png", "sample_002.png"]
    on_disk = json.loads((out / "importance.json").read_text())
    assert on_disk["num_samples"] == 3 and len(on_disk["samples"]) == 3 and on_disk == json.loads(json.dumps(summary))
    per_layer = on_disk["per_layer"]
    assert len(per_layer["mean_weight_visual"]) == on_disk["num_layers"] == len(per_layer["mean_weight_text"])
    assert "calibration_set" in on_disk
    assert all(0 < e["answer_curvature"] < 1 for e in on_disk["samples"])  # a random tiny model is unsure, never certain
    with safe_open(str(out / "importance.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"sample_000.raw", "sample_000.weights", "sample_000.visual_mask", "sample_000.answer_mask", "sample_000.input_ids"} <= keys
        w, ids = f.get_tensor("sample_002.weights"), f.get_tensor("sample_002.input_ids")
        assert w.shape == (on_disk["num_layers"], ids.shape[0]) and f.get_tensor("sample_002.visual_mask").dtype == torch.bool
    for e in on_disk["samples"]:
        with Image.open(out / e["png"]) as im:
            im.load()
            assert im.format == "PNG" and im.mode == "RGB" and im.width >= 600 and 150 <= im.height <= 2000
    # refuses to clobber without overwrite, before loading anything; with it, rewrites and drops stale PNGs
    with pytest.raises(ConfigError, match="already exists"):
        run_importance("/nonexistent/model", tiny_calib_jsonl, out, num_samples=1, max_seq_len=4096, cfg=ImportanceConfig())
    run_importance(tiny_vlm_dir("qwen2_vl"), tiny_calib_jsonl, out, num_samples=1, max_seq_len=4096, cfg=ImportanceConfig(kind="modality"), device="cpu", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".tlq-output.json", "importance.json", "importance.safetensors", "sample_000.png"]
    assert json.loads((out / "importance.json").read_text())["config"]["kind"] == "modality"


def test_input_gradients_shift_the_output_gradients(tiny_vlm_dir, tiny_calib_jsonl):
    """grad_at='input': layer l's input gradient is layer l-1's output gradient (the residual stream),
    and layer 0's is the gradient at the embeddings, equal to full back-propagation's."""
    adapter, model, processor, *_ = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    sample = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=1, max_seq_len=4096, seed=0)[0]
    out_g = layerwise_token_gradients(adapter, model, sample).grad
    in_g = layerwise_token_gradients(adapter, model, sample, at="input").grad
    torch.testing.assert_close(in_g[1:], out_g[:-1])
    li = adapter.capture_layer0_inputs(model, sample.inputs)
    h0 = li.hidden_states.clone().requires_grad_(True)
    h = h0
    with torch.enable_grad():
        for i, layer in enumerate(adapter.decoder_layers(model)):
            h = adapter.layer_step(i, layer, h, li.kwargs, li.between)
        ids = sample.inputs["input_ids"][0]
        tgt = sample.answer_mask.nonzero().reshape(-1)
        logits = model.get_submodule(adapter.spec.lm_head)(get_submodule(model, adapter.spec.final_norm)(h))
        torch.nn.functional.cross_entropy(logits[0, tgt - 1].float(), ids[tgt]).backward()
    torch.testing.assert_close(in_g[0], h0.grad[0].pow(2).sum(-1), rtol=1e-4, atol=1e-10)


# --- per-linear importance (grad_at="linear") ----------------------------------------------------
def _full_backprop_linear_grad2(adapter, model, sample, names):
    """||dL/dy||^2 at every linear's output ``y`` of every decoder layer, by ordinary back-propagation."""
    outs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for n in names:
            def keep(_m, _a, y, key=(i, n)):
                y.retain_grad()
                outs[key] = y

            handles.append(layer.get_submodule(n).register_forward_hook(keep))
    try:
        with torch.enable_grad():
            logits = model(**sample.inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    ids = sample.inputs["input_ids"][0]
    tgt = sample.answer_mask.nonzero().reshape(-1)
    tgt = tgt[tgt > 0]
    torch.nn.functional.cross_entropy(logits[0, tgt - 1].float(), ids[tgt]).backward()
    model.zero_grad(set_to_none=True)
    n_layers = len(adapter.decoder_layers(model))
    return torch.stack([torch.stack([outs[(i, n)].grad[0].pow(2).sum(-1) for n in names]) for i in range(n_layers)]).detach()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_per_linear_gradients_equal_full_backprop(tiny_vlm_dir, tiny_calib_jsonl, family):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, family)
    sample = samples[1]
    tg = layerwise_token_gradients(adapter, model, sample, at="linear")
    layers = adapter.decoder_layers(model)
    assert tg.linear_names == tuple(n for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear))
    assert len(tg.linear_names) == 7 and tg.grad.shape == (len(layers), 8, sample.seq_len)
    # row 0 is the decoder layer's output gradient, as with at="output"
    torch.testing.assert_close(tg.grad[:, 0], layerwise_token_gradients(adapter, model, sample).grad, rtol=0, atol=0)
    ref = _full_backprop_linear_grad2(adapter, model, sample, tg.linear_names)
    torch.testing.assert_close(tg.grad[:, 1:], ref, rtol=1e-4, atol=1e-10)
    # the point of it: k/v errors at visual tokens reach the answer through attention, so the k_proj
    # rows give visual tokens a far larger share than the layer output's own gradient does
    k = 1 + next(i for i, n in enumerate(tg.linear_names) if n.endswith("k_proj"))
    vis = sample.visual_mask
    share = lambda row: float(row[:, vis].sum() / row.sum())  # noqa: E731
    assert share(tg.grad[:-1, k]) > 2 * share(tg.grad[:-1, 0])


def test_per_linear_weights_reach_each_linear(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl", n=3)
    cfg = ImportanceConfig(grad_at="linear")
    tcs = build_token_calibration_set(adapter, model, samples, cfg, SelectionConfig(token_fraction=0.5, token_floor=0))
    names = tcs.linear_names
    assert tcs.weights[0].shape == (tcs.num_layers, 1 + len(names), samples[0].seq_len)
    fn = tcs.weight_fn()
    # each row is integrated and selected on its own: every row keeps the budget, rows differ
    for name in names:
        w = fn(1, 0, name)
        assert int((w > 0).sum()) == round(0.5 * samples[0].seq_len)
    assert not torch.equal(fn(1, 0, "self_attn.k_proj"), fn(1, 0, "mlp.down_proj"))
    assert torch.equal(fn(1, 0), tcs.weights[0][1, 0])  # no linear named: the layer output's row
    with pytest.raises(KeyError, match="no token weights for linear"):
        fn(1, 0, "visual.merger")
    json.dumps(tcs.summary())
    # the engine asks per linear: record what each linear's Hessian was fed
    seen: dict[str, torch.Tensor] = {}

    def spy(index, sample, linear=None):
        w = fn(index, sample) if linear is None else fn(index, sample, linear)
        if index == 1 and sample == 0 and linear is not None:
            seen[linear] = w
        return w

    engine = LayerwiseEngine(adapter, model, build_config("w4a16", "gptq"), torch.device("cpu"), token_weights=spy, progress=False)
    engine.calibrate(samples)
    assert set(seen) == set(names)
    for name in names:
        assert torch.equal(seen[name], fn(1, 0, name))


def test_tlq_runs_the_vision_tower_once_per_sample(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch):
    """The importance pass and the engine share each sample's layer-0 capture (vision tower, projector,
    embeddings): the expensive part of both would otherwise run twice."""
    from tlq.api import calibrate
    from tlq.models.base import ModelAdapter

    calls = []
    real = ModelAdapter.capture_layer0_inputs

    def counting(self, model, inputs):
        calls.append(1)
        return real(self, model, inputs)

    monkeypatch.setattr(ModelAdapter, "capture_layer0_inputs", counting)
    run = calibrate(tiny_vlm_dir("qwen2_vl"), tiny_calib_jsonl, build_config("w4a16", "tlq", num_samples=4, device="cpu", search_grid=2), progress=False)
    assert run.token_set is not None and len(calls) == run.num_samples == 4


@pytest.mark.parametrize("streamed", [False, True])
def test_bf16_importance_runs_its_matmuls_in_bf16_and_stays_close(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, streamed):
    """``matmul_dtype="bfloat16"``: the decoder layers' linears compute in bf16, forward and in the
    backward's recomputation, in both passes (loaded and streamed layers); the per-token gradients stay
    within bf16 rounding of float32 (per layer, cosine > 0.99); ``"auto"`` on a CPU without native bf16
    keeps float32."""
    from tlq.importance.gradients import token_gradients
    from tlq.models.streaming import ResidentLayers

    adapter, model, _proc, samples = _setup(tiny_vlm_dir, tiny_calib_jsonl, "qwen2_vl")
    layers = adapter.decoder_layers(model)
    seen: set[torch.dtype] = set()
    layers[0].mlp.down_proj.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))

    def grads(dtype: str) -> list[torch.Tensor]:
        seen.clear()
        got = token_gradients(adapter, model, samples[:2], at="linear", matmul_dtype=dtype, layers=ResidentLayers(adapter, model) if streamed else None)
        return [g.grad for g in got]

    exact, low = grads("compute"), grads("bfloat16")
    assert seen == {torch.bfloat16}
    for e, b in zip(exact, low):
        assert not torch.equal(e, b)
        cos = torch.nn.functional.cosine_similarity(e.flatten(1), b.flatten(1), dim=1)
        assert cos.min() > 0.99, cos
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    same = grads("auto")
    assert seen == {torch.float32}
    for e, s in zip(exact, same):
        torch.testing.assert_close(e, s, rtol=0, atol=0)
