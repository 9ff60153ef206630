"""Scale migration (AWQ / SmoothQuant): exact folding, a search that never loses, and engine wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tlq.api import build_config, load_model
from tlq.config import SCHEMES
from tlq.data.calibration import load_calibration
from tlq.engine import smoothing
from tlq.engine.layerwise import LayerwiseEngine
from tlq.quant.rtn import rtn_quantize
from tlq.utils.precision import resolve_matmul_dtype
from tlq.quant.scale_search import (
    ChannelStatsAccumulator,
    alpha_grid,
    candidate_applied,
    can_fold,
    candidate_scales,
    coarse_to_fine,
    fold_scales,
    search_scales,
)


class _Norm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _outlier_inputs(n_tok: int = 512, n: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tok, n, generator=g)
    x[:, :4] *= 30.0  # a few outlier channels, as in real LLM activations
    return x


@pytest.mark.parametrize("prev_kind", ["norm", "linear"])
def test_fold_preserves_the_function(prev_kind):
    torch.manual_seed(0)
    prev = _Norm(128) if prev_kind == "norm" else nn.Linear(64, 128)
    lins = [nn.Linear(128, 32), nn.Linear(128, 16)]
    x = torch.randn(10, 128 if prev_kind == "norm" else 64)
    before = [lin(prev(x)) for lin in lins]
    assert can_fold(prev, lins)
    fold_scales(prev, lins, torch.rand(128) * 4 + 0.1)
    for lin, ref in zip(lins, before):
        torch.testing.assert_close(lin(prev(x)), ref, rtol=1e-5, atol=1e-5)


def test_cannot_fold_mismatched_widths():
    assert not can_fold(nn.Linear(8, 64), [nn.Linear(128, 8)])
    assert not can_fold(_Norm(128), [nn.Linear(128, 8), nn.Linear(64, 8)])


def test_smoothquant_scales_flatten_activation_outliers():
    x = _outlier_inputs()
    lin = nn.Linear(128, 64)
    acc = ChannelStatsAccumulator(128)
    acc.add(x)
    s = candidate_scales("smoothquant", 0.5, acc.result(), [lin])
    assert (x / s).abs().amax(0).max() / (x / s).abs().amax(0).median() < x.abs().amax(0).max() / x.abs().amax(0).median()


def test_channel_stats_ignore_zero_weight_tokens():
    x = torch.ones(4, 8)
    x[2:] = 100.0
    acc = ChannelStatsAccumulator(8)
    acc.add(x, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    st = acc.result()
    assert torch.allclose(st.abs_mean, torch.ones(8)) and torch.allclose(st.abs_max, torch.ones(8))


def test_awq_search_never_loses_and_helps_on_outliers():
    torch.manual_seed(0)
    x = _outlier_inputs()
    norm, lin = _Norm(128), nn.Linear(128, 64, bias=False)
    ref = lin(norm(x)).detach()
    spec = SCHEMES["w3a16"].weights
    acc = ChannelStatsAccumulator(128)
    acc.add(norm(x).detach())

    def loss() -> float:
        w0 = lin.weight.detach().clone()
        lin.weight.data.copy_(rtn_quantize(lin.weight, spec).dequantize())
        with torch.no_grad():
            err = float((lin(norm(x)) - ref).pow(2).sum())
        lin.weight.data.copy_(w0)
        return err

    result = search_scales("awq", norm, [lin], acc.result(), alpha_grid(20), loss)
    assert result.loss <= result.baseline_loss
    assert result.loss < 0.9 * result.baseline_loss  # outlier channels make scaling worth it
    assert abs(loss() - result.loss) < 1e-6 * result.baseline_loss  # the chosen scales stay folded


def test_awq_exponent_zero_is_the_baseline_and_is_not_run_again():
    """AWQ's alpha = 0 gives s = 1 exactly (the unscaled layer): its loss is the baseline's, reused, so a
    grid of n costs n losses, not n + 1; SmoothQuant's alpha = 0 (1 / max|W|) is a real candidate."""
    torch.manual_seed(0)
    x = _outlier_inputs()
    norm, lin = _Norm(128), nn.Linear(128, 64, bias=False)
    ref = lin(norm(x)).detach()
    acc = ChannelStatsAccumulator(128)
    acc.add(norm(x).detach())
    calls = [0]

    def loss() -> float:
        calls[0] += 1
        with torch.no_grad():
            return float((lin(norm(x)) - ref).pow(2).sum() + (lin.weight - 0.1).pow(2).sum())

    with candidate_applied([lin], candidate_scales("awq", 0.0, acc.result(), [lin])), torch.no_grad():
        assert loss() == (baseline := loss())  # s = 1: bit for bit the unscaled loss
    calls[0] = 0
    result = search_scales("awq", norm, [lin], acc.result(), alpha_grid(5), loss)
    assert calls[0] == 5 and result.losses[0] == result.baseline_loss == baseline
    calls[0] = 0
    search_scales("smoothquant", norm, [lin], acc.result(), alpha_grid(5), loss)
    assert calls[0] == 6


@pytest.mark.parametrize("method", ["awq", "smoothquant", "mbq"])
def test_engine_scale_search_runs_and_keeps_fp_function(tiny_vlm_dir, tiny_calib_jsonl, method):
    """Searched scales are folded exactly: with quantization disabled (8-bit weights barely move) the
    layer error stays tiny, and each mapping reports its exponent."""
    adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)
    cfg = build_config("w4a16" if method == "awq" else "w8a8", method, weighting="uniform", search_grid=4)
    result = LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
    for layer in result.layers:
        assert set(layer.search_alphas) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # GQA: no v->o
    if method == "smoothquant":
        assert all(a == 0.5 for layer in result.layers for a in layer.search_alphas.values())


def test_candidate_applied_matches_folding_and_restores_weights():
    """Evaluating a candidate at the linears' inputs computes what folding it into the producer does,
    and leaves every weight bit-identical afterwards."""
    torch.manual_seed(0)
    norm, lins = _Norm(128), [nn.Linear(128, 32), nn.Linear(128, 16)]
    x = torch.randn(10, 128)
    s = torch.rand(128) * 4 + 0.1
    before = [lin.weight.detach().clone() for lin in lins]
    with candidate_applied(lins, s):
        applied = [lin(norm(x)) for lin in lins]
    assert all(torch.equal(lin.weight, w) for lin, w in zip(lins, before))
    fold_scales(norm, lins, s)
    for lin, out in zip(lins, applied):
        torch.testing.assert_close(lin(norm(x)), out, rtol=1e-5, atol=1e-5)


def _record_searches(monkeypatch, stats: list | None = None) -> list:
    """Every search's result, in order (and, into ``stats``, the channel statistics it searched on)."""
    import tlq.engine.smoothing as sm

    seen = []

    def recording(*args, **kwargs):
        result = search_scales(*args, **kwargs)
        seen.append(result)
        if stats is not None:
            stats.append(args[3])
        return result

    monkeypatch.setattr(sm, "search_scales", recording)
    return seen


def _assert_same_search(fast: list, fast_res, ref: list, ref_res, codes: bool = True) -> None:
    """Two calibrations searched alike: the same losses (to 1e-4), exponents and, with ``codes``, codes."""
    assert len(fast) == len(ref) > 0
    for a, b in zip(fast, ref):
        torch.testing.assert_close(torch.tensor([a.baseline_loss, *a.losses]), torch.tensor([b.baseline_loss, *b.losses]), rtol=1e-4, atol=1e-9, equal_nan=True)
    assert [repr(la.search_alphas) for la in fast_res.layers] == [repr(lb.search_alphas) for lb in ref_res.layers]
    if codes:
        for name, qw in ref_res.quantized.items():
            assert torch.equal(fast_res.quantized[name].codes, qw.codes), name


def test_layer_scope_on_the_mlp_alone_gives_the_layer_losses(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch):
    """The MLP's output is added unchanged to the layer output, so measuring MLP mappings on the MLP
    alone (what the layer scope does) must give the whole layer's losses and the same exponents."""
    import tlq.engine.smoothing as sm

    adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)
    cfg = build_config("w3a16", "awq", weighting="uniform", search_grid=6, solver="rtn", search_scope="layer")
    runs = {}
    for how in ("block", "whole layer"):
        _a, model, _p, _d, _dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
        seen = _record_searches(monkeypatch)
        if how == "whole layer":  # the reference: every candidate run through the whole decoder layer
            monkeypatch.setattr(sm, "loss_module", lambda config, mapping: "")
        result = LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
        runs[how] = (seen, result)
        monkeypatch.undo()
    (fast, fast_res), (ref, ref_res) = runs["block"], runs["whole layer"]
    assert len(fast) == len(ref) == 3 * len(fast_res.layers)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(torch.tensor([a.baseline_loss, *a.losses]), torch.tensor([b.baseline_loss, *b.losses]), rtol=1e-4, atol=1e-9, equal_nan=True)
    assert [repr(la.search_alphas) for la in fast_res.layers] == [repr(lb.search_alphas) for lb in ref_res.layers]  # NaN = unscaled
    for name, qw in ref_res.quantized.items():
        assert torch.equal(fast_res.quantized[name].codes, qw.codes), name


def test_block_scope_judges_attention_mappings_without_the_mlp(tiny_vlm_dir, tiny_calib_jsonl):
    """AWQ's own loss stops at the attention output: the q/k/v candidates never run the MLP, so the
    search does less work than with the layer scope (counted as MLP calls)."""
    calls = {}
    for scope in ("layer", "block"):
        adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
        samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)
        count = [0]
        for layer in adapter.decoder_layers(model):
            layer.mlp.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        cfg = build_config("w3a16", "awq", weighting="uniform", search_grid=6, solver="rtn", search_scope=scope)
        result = LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
        assert all(len(layer.search_alphas) == 3 for layer in result.layers)
        calls[scope] = count[0]
    n_layers = len(result.layers)
    # with "layer", per layer and sample, the q/k/v mapping's 6 losses (baseline + 5 exponents: AWQ's
    # alpha = 0 is the baseline) ran the MLP; "block" does not (the FP targets of "layer" come from the
    # statistics pass, a whole-layer forward with either scope)
    assert calls["layer"] - calls["block"] == n_layers * 6 * 3


def test_coarse_to_fine_tries_a_third_then_the_neighbours_of_the_best():
    alphas = alpha_grid(20)
    calls: list[int] = []

    def loss_at(alpha: float) -> float:
        calls.append(round(alpha * 20))
        return (alpha - 0.55) ** 2  # smooth, minimum between grid points 10 and 11

    tried = coarse_to_fine(alphas, 3, loss_at)
    assert sorted(calls) == sorted(tried) and len(calls) == len(set(calls))  # each exponent at most once
    assert calls[:7] == [0, 3, 6, 9, 12, 15, 18]  # the coarse pass first
    assert set(calls[7:]) == {10, 11, 13, 14}  # best coarse point 12 (0.60): its 2 neighbours on each side
    assert min(tried, key=tried.get) == 11  # what the full grid picks
    assert len(coarse_to_fine(alphas, 1, loss_at)) == 20


def test_coarse_to_fine_ignores_nan_losses_and_keeps_grid_order_on_ties():
    alphas = alpha_grid(10)
    tried = coarse_to_fine(alphas, 3, lambda a: float("nan") if a < 0.5 else 1.0)
    assert all(tried[i] == 1.0 for i in (6, 9)) and 5 in tried and 7 in tried  # refined around 6, the first finite best
    with pytest.raises(ValueError, match="coarse"):
        coarse_to_fine(alphas, 0, lambda a: 0.0)


def test_search_coarse_is_an_option_that_survives_a_change_of_search_kind():
    from tlq.config import ConfigError

    cfg = build_config("w4a16", "tlq", search_coarse=3, scale_search="smoothquant")
    assert cfg.search.coarse == 3 and cfg.search.kind == "smoothquant" and cfg.search.fixed_alpha is None
    with pytest.raises(ConfigError, match="search-coarse"):
        build_config("w4a16", "tlq", search_coarse=0)


def test_unknown_search_scope_is_refused():
    from tlq.config import ConfigError

    with pytest.raises(ConfigError, match="scope"):
        build_config("w4a16", "awq", search_scope="model")


@pytest.mark.parametrize("scope", ["block", "layer"])
def test_rowwise_blocks_search_only_the_weighted_rows(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, scope):
    """Tokens outside the calibration budget (weight 0) add nothing to a candidate's loss, so MLP and
    o_proj candidates (row-wise blocks) run on the kept rows only, and so does the MLP (and o_proj) when
    an attention candidate is judged on the whole layer (scope "layer"): same losses, same exponents and
    codes as running every row, and the MLP sees fewer rows."""
    from dataclasses import replace

    adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)

    def weights(layer: int, sample: int, linear: str | None = None) -> torch.Tensor:
        w = torch.linspace(0.5, 1.5, samples[sample].seq_len)
        w[::3] = 0.0  # a third of the tokens outside the budget
        return w

    cfg = build_config("w3a16", "awq", search_grid=6, solver="rtn", search_scope=scope)
    runs = {}
    for how in ("kept rows", "every row", "whole layer calls uncut"):
        _a, model, _p, _d, _dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
        if how == "every row":
            spec = replace(adapter.spec, smooth_mappings=tuple(replace(m, rowwise=False) for m in adapter.spec.smooth_mappings))
            monkeypatch.setattr(adapter, "spec", spec)
        if how == "whole layer calls uncut":
            monkeypatch.setattr(smoothing, "row_cuts", lambda *_a: [])
        rows = [0]
        for layer in adapter.decoder_layers(model):
            layer.mlp.gate_proj.register_forward_hook(lambda _m, args, _o: rows.__setitem__(0, rows[0] + args[0].shape[1]))
        seen = _record_searches(monkeypatch)
        result = LayerwiseEngine(adapter, model, cfg, dev, token_weights=weights, progress=False).calibrate(samples)
        runs[how] = (seen, result, rows[0])
        monkeypatch.undo()
    (fast, fast_res, fast_rows), (ref, ref_res, ref_rows) = runs["kept rows"], runs["every row"]
    _assert_same_search(fast, fast_res, ref, ref_res)
    assert fast_rows < ref_rows
    _seen, _res, uncut_rows = runs["whole layer calls uncut"]
    if scope == "layer":  # the attention candidates' whole-layer calls run the MLP on the kept rows too
        assert fast_rows < uncut_rows
    else:  # block scope never calls the whole layer
        assert fast_rows == uncut_rows


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5", "llava_onevision"])
def test_whole_layer_candidates_on_kept_rows_give_the_same_losses_in_every_family(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family):
    """TLQ's layer-scope attention candidates run the layer's row-wise blocks (MLP or MoE block, o_proj)
    on the kept rows only: the losses and exponents equal those of full-layer calls, whatever the block."""
    _assert_cut_alike(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family, "row_cuts")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5", "llava_onevision"])
def test_record_passes_on_kept_rows_record_the_same_statistics(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family):
    """The FP pass that records a mapping runs the MLP, o_proj and attention queries at the kept rows only:
    the channel statistics equal those of the uncut pass to float rounding. (Rounding can still move one
    fake-quantized weight across a boundary, so later losses are not compared.)"""
    (cut, result), (uncut, _) = _assert_cut_alike(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family, "layer_row_cuts", compare=False)
    num_mappings = len(result.layers[0].search_alphas)
    assert num_mappings >= 3
    for a, b in zip(cut[:num_mappings], uncut[:num_mappings]):  # layer 0: the same folds before each pass
        torch.testing.assert_close(a.abs_mean, b.abs_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.abs_max, b.abs_max, rtol=1e-5, atol=1e-7)


def _assert_cut_alike(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family: str, uncut: str, compare: bool = True):
    """TLQ's search with half the tokens outside the budget, once as is and once with ``uncut`` (a row-cut
    installer of tlq.engine.smoothing) doing nothing: the same search (``compare``), or the statistics each
    search call got, per run."""
    cfg = build_config("w4a8", "tlq", search_grid=5, solver="rtn", num_samples=2, kept_rows_passes=True)
    runs, stats = [], []
    for cut in (True, False):
        adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
        samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=2, max_seq_len=4096, seed=0)

        def weights(layer: int, sample: int, linear: str | None = None, n=[s.seq_len for s in samples]) -> torch.Tensor:
            w = torch.linspace(0.5, 1.5, n[sample])
            w[1::2] = 0.0  # half the tokens outside the budget
            return w

        if not cut:
            monkeypatch.setattr(smoothing, uncut, lambda *_a: [])
        seen = _record_searches(monkeypatch, got := [])
        result = LayerwiseEngine(adapter, model, cfg, dev, token_weights=weights, progress=False).calibrate(samples)
        runs.append((seen, result))
        stats.append((got, result))
        monkeypatch.undo()
    if compare:
        (fast, fast_res), (ref, ref_res) = runs
        _assert_same_search(fast, fast_res, ref, ref_res, codes=False)
    return stats


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_expert_candidates_judged_with_their_expert_alone_give_the_same_losses(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family):
    """An expert's up->down candidates run the MoE block with that expert alone (target and candidates):
    the losses, exponents and codes equal those of running every routed expert, and the other experts
    never run during them."""
    import contextlib

    from tlq.models.moe import UnfusedExperts

    # recorded mapping by mapping, the two differ only in the expert alone (one layer pass records the
    # non-expert mappings before any fold, the expert ones after: rounding-level apart, see
    # test_one_record_pass_per_layer_equals_one_per_mapping)
    cfg = build_config("w4a16", "tlq", search_grid=5, solver="rtn", num_samples=2, search_record="mapping")
    runs = []
    for alone in (True, False):
        adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
        samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=2, max_seq_len=4096, seed=0)
        if not alone:
            monkeypatch.setattr(smoothing, "_one_expert", lambda layer, linears, block: contextlib.nullcontext)
        experts_run: list[tuple[int, int]] = []
        for mod in model.modules():
            if isinstance(mod, UnfusedExperts):
                for e, ex in enumerate(mod):
                    ex.register_forward_hook(lambda _m, _a, _o, e=e, mod=mod: experts_run.append((e, mod.only)) if mod.only is not None else None)
        seen = _record_searches(monkeypatch)
        result = LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
        runs.append((seen, result, experts_run))
        monkeypatch.undo()
    (fast, fast_res, fast_runs), (ref, ref_res, ref_runs) = runs
    _assert_same_search(fast, fast_res, ref, ref_res)
    assert fast_runs and all(e == only for e, only in fast_runs) and ref_runs == []  # alone: no other expert ran


def test_loss_precision_runs_matmuls_in_bf16_and_restores_the_weights():
    """bfloat16: inside, the block's large linears hold bf16 weights (cast once, not per call) and return
    float32 within bf16 rounding of the float32 output; linears under the size floor keep float32; after,
    the very same float32 tensors are back. "compute" changes nothing."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 64), nn.Linear(64, 8))
    x = torch.randn(32, 64)
    ref = block(x)
    lins = [m for m in block if isinstance(m, nn.Linear)]
    before = [(m.weight.data, m.bias.data) for m in lins]
    with torch.no_grad(), smoothing.loss_precision(block, "compute", min_weights=1000):
        assert all(m.weight.dtype == torch.float32 for m in lins)
        assert torch.equal(block(x), ref)
    with torch.no_grad(), smoothing.loss_precision(block, "bfloat16", min_weights=1000):
        assert [m.weight.dtype for m in lins] == [torch.bfloat16, torch.bfloat16, torch.float32]  # 64 x 8 is under the floor
        low = block(x)
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.02)
    assert all(m.weight.data_ptr() == w.data_ptr() and m.bias.data_ptr() == b.data_ptr() and m.weight.dtype == torch.float32 for m, (w, b) in zip(lins, before))
    assert torch.equal(block(x), ref)  # no hook left behind


def test_loss_precision_casts_only_the_expert_that_runs_alone():
    """While one expert is judged alone, the idle experts are neither cast nor hooked (they do not run),
    and the block's output is bit-identical to casting every expert first (what the search did before)."""
    from tlq.models.moe import ExpertMLP, UnfusedExperts, running_modules

    torch.manual_seed(0)
    experts = UnfusedExperts([ExpertMLP(64, 256, nn.functional.silu, torch.float32, torch.device("cpu")) for _ in range(4)])
    for p in experts.parameters():
        nn.init.normal_(p, std=0.05)
    x, index, weights = torch.randn(12, 64), torch.randint(0, 4, (12, 2)), torch.rand(12, 2)
    assert {id(m) for m in running_modules(experts)} == {id(m) for m in experts.modules()}
    with torch.no_grad(), smoothing.loss_precision(experts, "bfloat16", min_weights=1000), experts.alone(1):  # every expert cast
        every_cast = experts(x, index, weights)
    with torch.no_grad(), experts.alone(1):
        assert {id(m) for m in running_modules(experts)} == {id(experts), *(id(m) for m in experts[1].modules())}
        with smoothing.loss_precision(experts, "bfloat16", min_weights=1000):
            dtypes = [[lin.weight.dtype for lin in (ex.gate_proj, ex.up_proj, ex.down_proj)] for ex in experts]
            one = experts(x, index, weights)
    assert dtypes[1] == [torch.bfloat16] * 3 and all(d == [torch.float32] * 3 for e, d in enumerate(dtypes) if e != 1)
    hits = (index == 1).any(-1)
    assert hits.any() and one[hits].abs().sum() > 0 and torch.equal(one, every_cast)
    assert all(p.dtype == torch.float32 for p in experts.parameters())  # restored


class _GatedMLP(nn.Module):
    def __init__(self, hidden: int = 64, inner: int = 256, small: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.extra = nn.Linear(hidden, 2) if small else None  # under any useful size floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_loss_precision_runs_a_block_of_cast_linears_in_bf16_throughout():
    """A row-wise block whose parameters all belong to cast linears computes in bf16 between them (the
    down projection receives the bf16 gate product, no float32 round trip) and returns float32 close to
    the exact output; a block holding a linear under the floor keeps the per-linear casts."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    for small, expected in ((False, torch.bfloat16), (True, torch.float32)):
        mlp = _GatedMLP(small=small)
        seen: list[torch.dtype] = []
        mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype), prepend=True)
        ref = mlp(x)
        with torch.no_grad(), smoothing.loss_precision(mlp, "bfloat16", min_weights=1000, blocks=[mlp]):
            low = mlp(x)
        assert seen[-1] == expected and low.dtype == torch.float32
        torch.testing.assert_close(low, ref, rtol=0.05, atol=0.02)
        assert torch.equal(mlp(x), ref)  # every hook removed, weights float32 again


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5_moe"])
def test_bf16_search_losses_are_close_to_the_exact_ones(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family):
    """--search-dtype bfloat16 reaches the candidates' forwards (the MLP's linears run bf16 weights there;
    the size floor lowered to the tiny model's 128 x 256) and its losses stay within bf16 noise of the
    exact search's, the baselines included; also through Qwen3.5's linear attention and routed experts
    (where one candidate in a few dozen may move further: bf16 rounding can flip a near-tied route)."""
    monkeypatch.setattr(smoothing, "BF16_MIN_WEIGHTS", 128 * 256)
    adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)
    runs = {}
    for loss_dtype in ("compute", "bfloat16"):
        _a, model, _p, _d, _dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
        dtypes: set = set()
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.weight.numel() >= 128 * 256 and ".layers." in name:
                mod.register_forward_hook(lambda m, _a, _o: dtypes.add(m.weight.dtype))
        seen = _record_searches(monkeypatch)
        cfg = build_config("w3a16", "tlq", weighting="uniform", search_grid=6, search_coarse=1, solver="rtn", search_dtype=loss_dtype)
        LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
        runs[loss_dtype] = (seen, dtypes)
        monkeypatch.setattr(smoothing, "search_scales", search_scales)
    (exact, exact_dtypes), (low, low_dtypes) = runs["compute"], runs["bfloat16"]
    assert exact_dtypes == {torch.float32} and low_dtypes == {torch.float32, torch.bfloat16}  # FP passes stay float32
    assert len(exact) == len(low) > 0
    a = torch.tensor([[r.baseline_loss, *r.losses] for r in exact])
    b = torch.tensor([[r.baseline_loss, *r.losses] for r in low])
    assert not torch.equal(a, b)
    rel = (b - a).abs() / a.abs().clamp_min(1e-9)
    # within bf16 noise; a MoE candidate may move more where the rounding flips a near-tied routing choice
    assert float(rel.median()) < 0.01 and float((rel < 0.05).float().mean()) >= (1.0 if family == "qwen2_vl" else 0.95)


def test_auto_loss_dtype_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    """auto: bf16 matmuls on a CPU with AVX512-BF16 or AMX and on a GPU; float32 where bf16 is emulated."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for avx512_bf16, amx, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "compute")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_matmul_dtype("auto", cpu) == expected
        assert resolve_matmul_dtype("auto", gpu) == "bfloat16"
        assert resolve_matmul_dtype("compute", gpu) == "compute"
    block = nn.Linear(256, 256)  # no native bf16: auto leaves the weights alone
    with torch.no_grad(), smoothing.loss_precision(block, "auto", min_weights=1):
        assert block.weight.dtype == torch.float32


def test_whole_layer_targets_come_from_the_statistics_pass(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch):
    """The FP targets of candidates judged on the whole layer (TLQ's q/k/v) are the outputs of the
    mapping's own statistics pass, not of a second FP forward: one layer forward per sample fewer, and
    the same losses, exponents and codes as with the separate pass."""
    import tlq.engine.smoothing as sm
    from tlq.models.base import run_layer

    adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)
    cfg = build_config("w3a16", "tlq", weighting="uniform", search_grid=6, solver="rtn")
    runs = []
    for merged in (True, False):
        _a, model, _p, _d, _dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
        if not merged:  # the reference: the targets from an FP forward of their own, as before
            record = sm._record_mappings

            def separate(ctx, recordings, xs, kwargs, weights, layer_outputs=None):
                found = record(ctx, recordings, xs, kwargs, weights)
                if layer_outputs is not None:
                    layer_outputs.extend(run_layer(ctx.layer, ctx.dev(x), ctx.dev(kw)).to("cpu") for x, kw in zip(xs, kwargs))
                return found

            monkeypatch.setattr(sm, "_record_mappings", separate)
        forwards = [0]
        adapter.decoder_layers(model)[0].register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        seen = _record_searches(monkeypatch)
        runs.append((seen, LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples), forwards[0]))
        monkeypatch.undo()
    (fast, fast_res, fast_forwards), (ref, ref_res, ref_forwards) = runs
    assert fast_forwards == ref_forwards - len(samples)
    exact = torch.tensor([[r.baseline_loss, *r.losses] for r in fast]), torch.tensor([[r.baseline_loss, *r.losses] for r in ref])
    torch.testing.assert_close(*exact, rtol=0, atol=0, equal_nan=True)
    _assert_same_search(fast, fast_res, ref, ref_res)



@pytest.mark.parametrize("method", ["tlq", "awq"])
def test_one_record_pass_per_layer_equals_one_per_mapping(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, method):
    """``search.record="layer"`` records every mapping of a layer in one FP pass before the first fold;
    ``"mapping"`` records each after the folds before it. The folds leave the FP layer unchanged up to
    float rounding, so the first mapping searches bit for bit alike and each later one, while the
    exponents before it agree, from the same unscaled loss (to 1e-5); its candidates' scales come from
    statistics equal to rounding, which can move a weight across a rounding boundary (so their losses
    are not compared). The layer pass runs the layer once per sample instead of once per mapping."""
    adapter, model, processor, _d, dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=3, max_seq_len=4096, seed=0)
    runs = {}
    for record in ("layer", "mapping"):
        cfg = build_config("w3a16", method, weighting="uniform", search_grid=6, solver="rtn", search_record=record)
        _a, model, _p, _d, _dev, _dt = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
        forwards = [0]
        adapter.decoder_layers(model)[0].register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        seen = _record_searches(monkeypatch)
        LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
        runs[record] = (seen, forwards[0])
        monkeypatch.undo()
    (one, one_forwards), (each, each_forwards) = runs["layer"], runs["mapping"]
    per_layer = len(one) // len(adapter.decoder_layers(model))
    assert len(one) == len(each) and per_layer >= 2  # mappings that fold, per layer: the passes saved are per_layer - 1
    assert each_forwards - one_forwards == (per_layer - 1) * len(samples)
    first = torch.tensor([one[0].baseline_loss, *one[0].losses]), torch.tensor([each[0].baseline_loss, *each[0].losses])
    torch.testing.assert_close(*first, rtol=0, atol=0, equal_nan=True)
    compared = 0
    for a, b in zip(one, each):
        torch.testing.assert_close(a.baseline_loss, b.baseline_loss, rtol=1e-5, atol=0)
        compared += 1
        if a.alpha != b.alpha and not (math.isnan(a.alpha) and math.isnan(b.alpha)):
            break  # the folds differ from here on
    assert compared >= 2
