"""The layer-wise engine: standalone-layer replay, quantization-exposed streams, solver quality."""

from __future__ import annotations

import pytest
import torch

from tlq.api import build_config, load_model
from tlq.data.calibration import load_calibration
from tlq.engine.layerwise import LayerwiseEngine
from tlq.engine.solve import linear_groups
from tlq.models.base import run_layer
from tlq.models.tiny import FAMILIES


def _setup(tiny_vlm_dir, tiny_calib_jsonl, family="qwen2_vl", n=4):
    adapter, model, processor, _dir, dev, _dt = load_model(tiny_vlm_dir(family), device="cpu")
    samples = load_calibration(tiny_calib_jsonl, processor, adapter, model, num_samples=n, max_seq_len=4096, seed=0)
    return adapter, model, samples, dev


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_standalone_layers_reproduce_the_model(tiny_vlm_dir, tiny_calib_jsonl, family):
    """Layer 0's captured inputs walked through every layer with the adapter's step give the model's own
    layer outputs and logits (for Qwen3-VL: with DeepStack added between layers)."""
    adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, family, n=2)
    layers = adapter.decoder_layers(model)
    head = model.get_submodule(adapter.spec.lm_head)
    norm = model.get_submodule(adapter.spec.final_norm)
    for sample in samples:
        li = adapter.capture_layer0_inputs(model, sample.inputs)
        out = model(**sample.inputs, output_hidden_states=True, use_cache=False)
        expected = out.hidden_states
        h = li.hidden_states
        torch.testing.assert_close(h, expected[0])
        for i, layer in enumerate(layers):
            if i < len(layers) - 1:  # the last entry of hidden_states is after the final norm
                # transformers records each decoder layer's own output, before what the model adds between layers
                torch.testing.assert_close(run_layer(layer, h, li.kwargs), expected[i + 1], rtol=1e-5, atol=1e-5)
            h = adapter.layer_step(i, layer, h, li.kwargs, li.between)
        torch.testing.assert_close(head(norm(h)), out.logits, rtol=1e-5, atol=1e-5)


def test_linear_groups_follow_execution_order(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, samples, _ = _setup(tiny_vlm_dir, tiny_calib_jsonl, n=1)
    li = adapter.capture_layer0_inputs(model, samples[0].inputs)
    groups = linear_groups(adapter.decoder_layers(model)[0], li.hidden_states, li.kwargs)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _calibrate(tiny_vlm_dir, tiny_calib_jsonl, scheme, method, **kw):
    adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl)
    engine = LayerwiseEngine(adapter, model, build_config(scheme, method, **kw), dev, progress=False)
    return adapter, model, samples, engine.calibrate(samples)


def test_gptq_layer_error_below_rtn(tiny_vlm_dir, tiny_calib_jsonl):
    *_, rtn = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "rtn")
    *_, gptq = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "gptq")
    # Layer 0 sees identical inputs under both methods: a like-for-like comparison.
    assert gptq.layers[0].rel_error < 0.5 * rtn.layers[0].rel_error
    assert all(g.rel_error < r.rel_error for g, r in zip(gptq.layers, rtn.layers))


def test_quantized_path_is_exposed(tiny_vlm_dir, tiny_calib_jsonl):
    """Layer 0 is calibrated on identical inputs either way; later layers see the quantized stream."""
    *_, exposed = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w4a8", "gptq")
    *_, fp_inputs = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w4a8", "gptq", quantized_inputs=False)
    names0 = [n for n in exposed.quantized if ".layers.0." in n]
    names1 = [n for n in exposed.quantized if ".layers.1." in n]
    assert names0 and names1
    for n in names0:
        assert torch.equal(exposed.quantized[n].codes, fp_inputs.quantized[n].codes)
    changed = sum(not torch.equal(exposed.quantized[n].codes, fp_inputs.quantized[n].codes) for n in names1)
    assert changed == len(names1)


@torch.no_grad()
def test_calibration_stream_is_the_real_quantized_model(tiny_vlm_dir, tiny_calib_jsonl):
    """After calibration, the model itself (fake-quant weights + activation quantizers) computes the
    quantized stream: its last decoder layer output equals a layer-by-layer replay of the quantized layers,
    and differs from the FP model's."""
    adapter, model, samples, result = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w8a8", "rtn")
    adapter_fp, fp_model, *_ = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    sample = samples[0]
    q_hidden = model(**sample.inputs, output_hidden_states=True, use_cache=False).hidden_states
    fp_hidden = fp_model(**sample.inputs, output_hidden_states=True, use_cache=False).hidden_states
    li = adapter.capture_layer0_inputs(model, sample.inputs)
    h = li.hidden_states
    for i, layer in enumerate(adapter.decoder_layers(model)):
        h = adapter.layer_step(i, layer, h, li.kwargs, li.between)
    norm = model.get_submodule(adapter.spec.final_norm)
    torch.testing.assert_close(norm(h), q_hidden[-1])
    assert not torch.allclose(q_hidden[-1], fp_hidden[-1], atol=1e-3)


def test_vision_tower_and_head_untouched(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _samples, result = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w4a16", "gptq")
    _, fp_model, *_ = load_model(tiny_vlm_dir("qwen2_vl"), device="cpu")
    fp = dict(fp_model.named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, fp[n])}
    assert changed, "nothing was quantized"
    assert all(".language_model.layers." in n for n in changed)
    assert not any("visual" in n or "lm_head" in n or "embed" in n for n in changed)
    assert {n + ".weight" for n in result.quantized} == changed


def test_reports_have_one_entry_per_layer(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _samples, result = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w4a16", "rtn")
    assert [r.index for r in result.layers] == list(range(len(adapter.decoder_layers(model))))
    assert all(r.num_linears == 7 and r.rel_error > 0 and r.peak_mem_mb > 0 for r in result.layers)


def test_fp_target_follows_the_fp_model_more_closely(tiny_vlm_dir, tiny_calib_jsonl):
    """GPTQ with the FP target (W X_fp from X_q) undoes part of the error of the layers before: from the
    second layer on, the quantized stream stays closer to the FP stream than with plain GPTQ. Layer 0's
    first group sees identical inputs on both streams, so its codes do not change."""
    *_, plain = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "gptq")
    *_, fp = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "gptq", gptq_target="fp")
    q0 = [n for n in plain.quantized if n.endswith("layers.0.self_attn.q_proj")]
    assert q0 and torch.equal(plain.quantized[q0[0]].codes, fp.quantized[q0[0]].codes)
    assert fp.layers[-1].rel_error < plain.layers[-1].rel_error
    assert sum(r.rel_error for r in fp.layers[1:]) < sum(r.rel_error for r in plain.layers[1:])


@pytest.mark.parametrize("method,short", [("gptq", "fp"), ("awq", "q"), ("rtn", "both"), ("tlq", None)])
def test_a_stream_no_step_reads_runs_the_error_samples_only(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, method, short):
    """Plain GPTQ reads only the quantized stream, AWQ only the FP one, RTN neither, TLQ both: an unread
    stream runs the first ``error_samples`` samples (for the report's error), and the codes are those of a
    run with both streams whole."""
    lengths: list[int] = []
    advance = LayerwiseEngine._advance

    def counting(self, index, layer, xs, kwargs, between):
        lengths.append(len(xs))
        return advance(self, index, layer, xs, kwargs, between)

    monkeypatch.setattr(LayerwiseEngine, "_advance", counting)
    *_, cut = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w4a16", method, error_samples=2)
    fp_lengths, q_lengths = lengths[0::2], lengths[1::2]  # per layer: the FP stream, then the quantized one
    assert fp_lengths == [2 if short in ("fp", "both") else 4] * len(cut.layers)
    assert q_lengths == [2 if short in ("q", "both") else 4] * len(cut.layers)
    lengths.clear()
    *_, whole = _calibrate(tiny_vlm_dir, tiny_calib_jsonl, "w4a16", method, error_samples=0)
    assert lengths == [4] * (2 * len(whole.layers))
    assert whole.quantized.keys() == cut.quantized.keys()
    assert all(torch.equal(whole.quantized[n].codes, cut.quantized[n].codes) for n in whole.quantized)
    assert all(0 < c.rel_error < 1 for c in cut.layers)
    if short is None:
        assert [c.rel_error for c in cut.layers] == [w.rel_error for w in whole.layers]


def test_engine_runs_the_steps_the_config_lists_in_that_order(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch):
    """The preset's step list drives the layer: a step left out does not run, and the order is kept."""
    from dataclasses import replace

    from tlq.config import ConfigError
    from tlq.engine import steps as S

    adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, n=2)
    seen: list[tuple[int, str]] = []

    def spy(name: str):
        phase, step = S.STEPS[name]

        def wrapped(ctx, state):
            seen.append((ctx.index, name))
            step(ctx, state)

        return phase, wrapped

    monkeypatch.setattr(S, "STEPS", {n: spy(n) for n in S.STEPS})
    cfg = build_config("w4a16", "awq", num_samples=2, device="cpu")
    assert cfg.steps == ("scale_search", "solve")
    result = LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
    assert seen[:2] == [(0, "scale_search"), (0, "solve")] and len(seen) == 2 * len(result.layers)
    assert all(r.search_alphas for r in result.layers)

    seen.clear()
    adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, n=2)
    solve_only = LayerwiseEngine(adapter, model, replace(cfg, steps=("solve",)), dev, progress=False).calibrate(samples)
    assert {name for _i, name in seen} == {"solve"} and not any(r.search_alphas for r in solve_only.layers)
    with pytest.raises(ConfigError, match="autoround"):
        LayerwiseEngine(adapter, model, replace(cfg, steps=("scale_search", "autoround")), dev, progress=False)


@pytest.mark.parametrize("family,method", [("qwen2_vl", "tlq"), ("qwen3_5", "gptq"), ("qwen3_vl_moe", "gptq")])
def test_statistics_passes_stop_after_the_group_and_solve_alike(tiny_vlm_dir, tiny_calib_jsonl, monkeypatch, family, method):
    """Each group's statistics pass runs the layer (and, with the FP target, its FP copy) only as far as
    the group's linears: fewer MLP calls than whole forwards, and the same codes bit for bit (per expert
    too: a MoE stage never stops early). W4A8: the input quantizers' hooks are on the path."""
    import tlq.engine.solve as solve

    codes, mlp_calls = {}, {}
    for how in ("whole", "partial"):
        adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, family)
        if how == "whole":
            monkeypatch.setattr(solve._PartialForward, "run", lambda self, layer, x, kw: run_layer(layer, x, kw))
        count = [0]
        for layer in adapter.decoder_layers(model):
            layer.mlp.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        cfg = build_config("w4a8", method, weighting="uniform", scale_search="none", num_samples=4)
        result = LayerwiseEngine(adapter, model, cfg, dev, progress=False).calibrate(samples)
        codes[how], mlp_calls[how] = {k: q.codes for k, q in result.quantized.items()}, count[0]
        monkeypatch.undo()
    assert codes["whole"].keys() == codes["partial"].keys()
    assert all(torch.equal(codes["whole"][k], c) for k, c in codes["partial"].items())
    assert mlp_calls["partial"] < mlp_calls["whole"]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "qwen3_5", "qwen3_vl_moe"])
def test_statistics_passes_compute_the_kept_rows_only_and_solve_alike(tiny_vlm_dir, tiny_calib_jsonl, family):
    """With ``--kept-rows-passes``, the statistics passes (the layer's and its FP copy's) run the MLP and the
    attention queries at the rows some linear of the group keeps in the token-level set: fewer rows through
    the MLP's linears, and the codes of the uncut passes up to float rounding (attention in causal chunks).
    MoE stages (routed rows index the whole block input) and linear-attention layers keep what they can."""
    codes, mlp_rows = {}, {}
    for how in ("uncut", "cut"):
        adapter, model, samples, dev = _setup(tiny_vlm_dir, tiny_calib_jsonl, family)
        # half the tokens, not the preset's tenth: 4 tiny samples keep a handful of rows each at 10%, and Hessians that thin
        # turn float rounding into different codes (measured 0.93-0.96 equal), whatever the cut
        cfg = build_config("w4a8", "tlq", scale_search="none", num_samples=4, kept_rows_passes=how == "cut", token_floor=0, token_fraction=0.5)
        token_weights = _token_set(adapter, model, samples, cfg)
        rows = [0]  # rows through the (shared-expert) down_proj in the engine: streams and statistics passes
        for layer in adapter.decoder_layers(model):
            down = [m for n, m in layer.named_modules() if n.endswith("down_proj") and ".experts." not in n]
            for m in down:
                m.register_forward_pre_hook(lambda _m, args: rows.__setitem__(0, rows[0] + args[0][..., 0].numel()))
        result = LayerwiseEngine(adapter, model, cfg, dev, progress=False, token_weights=token_weights).calibrate(samples)
        codes[how], mlp_rows[how] = {k: q.codes for k, q in result.quantized.items()}, rows[0]
    assert codes["uncut"].keys() == codes["cut"].keys()
    same = sum(int((codes["uncut"][k] == c).sum()) for k, c in codes["cut"].items()) / sum(c.numel() for c in codes["cut"].values())
    assert same > 0.999  # measured 1.0 in all four families
    # uncut: two streams, the group discovery and two statistics passes (layer, FP copy) of every row; cut:
    # the statistics passes at the ~half of the rows the token set keeps (measured 0.81x in all four)
    assert mlp_rows["cut"] < 0.88 * mlp_rows["uncut"]


def _token_set(adapter, model, samples, cfg):
    from tlq.importance.calibset import build_token_calibration_set

    return build_token_calibration_set(adapter, model, samples, cfg.importance, cfg.selection).weight_fn()
