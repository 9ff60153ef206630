"""Qwen3.5 (dense hybrid decoder): per-kind layer masks in the replay, (1 + w) norm folds, 16-bit
linear-attention gates, quantize -> export -> reload.

The family-generic invariants (replay, gradients vs full back-propagation, streaming) run for
``qwen3_5`` through ``FAMILIES`` in the other test files; this file tests what only Qwen3.5 has.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tlq.api import build_config, calibrate
from tlq.data.calibration import load_calibration
from tlq.models.base import run_layer
from tlq.models.qwen3_5 import FULL_ATTENTION, LINEAR_ATTENTION, Qwen3_5Adapter
from tlq.pipeline import load_model, write_output
from tlq.quant.scale_search import can_fold, fold_scales

FAMILY = "qwen3_5"


def _sample(adapter, model, processor, calib):
    return load_calibration(calib, processor, adapter, model, num_samples=1, max_seq_len=4096, seed=0)[0]


@torch.no_grad()
def test_each_kind_of_layer_gets_its_own_mask(tiny_vlm_dir, tiny_calib_jsonl):
    """With eager attention the full-attention layers need the causal mask the text model builds for
    them, the linear-attention layers (layer 0 among them) get none: a walk with layer 0's arguments
    would run full attention unmasked."""
    adapter, model, processor, *_ = load_model(tiny_vlm_dir(FAMILY, num_layers=4), device="cpu")
    assert isinstance(adapter, Qwen3_5Adapter)
    assert model.config.text_config.layer_types == [LINEAR_ATTENTION, FULL_ATTENTION] * 2
    model.set_attn_implementation("eager")
    sample = _sample(adapter, model, processor, tiny_calib_jsonl)
    li = adapter.capture_layer0_inputs(model, sample.inputs)
    assert li.kwargs["attention_mask"] is None  # layer 0 is a linear-attention layer
    assert isinstance(adapter.layer_kwargs(1, li.kwargs, li.between)["attention_mask"], torch.Tensor)

    def walk(step: bool) -> torch.Tensor:
        h = li.hidden_states
        for i, layer in enumerate(adapter.decoder_layers(model)):
            h = adapter.layer_step(i, layer, h, li.kwargs, li.between) if step else run_layer(layer, h, li.kwargs)
        return model.lm_head(model.model.language_model.norm(h))

    expected = model(**sample.inputs, use_cache=False).logits
    torch.testing.assert_close(walk(step=True), expected, rtol=1e-5, atol=1e-5)
    assert (walk(step=False) - expected).abs().max() > 1e-3


@torch.no_grad()
def test_folds_respect_the_one_plus_w_norms_and_the_passive_gates(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, processor, *_ = load_model(tiny_vlm_dir(FAMILY), device="cpu")
    li = adapter.capture_layer0_inputs(model, _sample(adapter, model, processor, tiny_calib_jsonl).inputs)
    g = torch.Generator().manual_seed(0)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        kwargs = adapter.layer_kwargs(index, li.kwargs, li.between)
        want = run_layer(layer, li.hidden_states, kwargs)
        wrong = [m for m in adapter.smooth_mappings(layer) if m.prev_offset]
        assert wrong and all(m.prev.endswith("layernorm") for m in wrong)
        folded = []
        for m in adapter.smooth_mappings(layer):
            prev = layer.get_submodule(m.prev)
            mods = [layer.get_submodule(n) for n in m.linears + m.passive]
            if can_fold(prev, mods):
                fold_scales(prev, mods, torch.rand(mods[0].in_features, generator=g) + 0.5, m.prev_offset)
                folded.append(m.prev)
        assert "input_layernorm" in folded and "post_attention_layernorm" in folded
        torch.testing.assert_close(run_layer(layer, li.hidden_states, kwargs), want, rtol=1e-4, atol=1e-5)
        # folding as for a plain norm (w / s) breaks a (1 + w) norm: the offset is what keeps it exact
        norm, mlp_in = layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]
        fold_scales(norm, mlp_in, torch.rand(norm.weight.shape[0], generator=g) + 0.5)
        assert (run_layer(layer, li.hidden_states, kwargs) - want).abs().max() > 1e-3



@torch.no_grad()
def test_moe_norm_fold_scales_router_and_shared_gate_too(tiny_vlm_dir, tiny_calib_jsonl):
    """Qwen3.5 MoE: ``post_attention_layernorm -> routed and shared experts`` folds exactly through the
    (1 + w) norm with the router's and the shared-expert gate's columns scaled too (routing unchanged)."""
    adapter, model, processor, *_ = load_model(tiny_vlm_dir("qwen3_5_moe"), device="cpu")
    li = adapter.capture_layer0_inputs(model, _sample(adapter, model, processor, tiny_calib_jsonl).inputs)
    g = torch.Generator().manual_seed(0)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        kwargs = adapter.layer_kwargs(index, li.kwargs, li.between)
        want = run_layer(layer, li.hidden_states, kwargs)
        (fold,) = [m for m in adapter.smooth_mappings(layer) if m.prev == "post_attention_layernorm"]
        assert fold.passive == ("mlp.gate", "mlp.shared_expert_gate") and fold.prev_offset == 1.0 and fold.stats_from == "mlp.gate"
        assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.experts.0.gate_proj"} <= set(fold.linears)
        mods = [layer.get_submodule(n) for n in fold.linears + fold.passive]
        assert can_fold(layer.post_attention_layernorm, mods)
        fold_scales(layer.post_attention_layernorm, mods, torch.rand(mods[0].in_features, generator=g) * 2 + 0.5, fold.prev_offset)
        torch.testing.assert_close(run_layer(layer, li.hidden_states, kwargs), want, rtol=1e-4, atol=1e-5)

def test_linear_attention_gates_stay_16_bit(tiny_vlm_dir, tiny_calib_jsonl):
    model_dir = tiny_vlm_dir(FAMILY)
    cfg = build_config("w4a16", "awq", num_samples=4, device="cpu", search_grid=4)
    run = calibrate(model_dir, tiny_calib_jsonl, cfg, progress=False)
    names = set(run.result.quantized)
    prefix = "model.language_model.layers.0.linear_attn."
    assert {prefix + "in_proj_qkv", prefix + "in_proj_z", prefix + "out_proj"} <= names
    assert not any(n.endswith(("in_proj_a", "in_proj_b")) for n in names)
    assert run.result.layers[0].search_alphas.keys() >= {"input_layernorm", "post_attention_layernorm"}


@pytest.mark.parametrize(("method", "scheme"), [("gptq", "w4a16"), ("tlq", "w4a8")])
def test_quantize_export_reload_equals_the_calibrated_model(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, method, scheme):
    model_dir = tiny_vlm_dir(FAMILY)
    cfg = build_config(scheme, method, num_samples=4, device="cpu", search_grid=4)
    run = calibrate(model_dir, tiny_calib_jsonl, cfg, progress=False)
    assert len(run.result.quantized) == 6 + 7 and all(r.rel_error > 0 for r in run.result.layers)
    write_output(run, None, tmp_path / "q", overwrite=False)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    assert reloaded.model.language_model.layers[0].linear_attn.in_proj_a.weight.dtype == torch.float32  # left dense
    sample = _sample(run.adapter, run.model, run.processor, tiny_calib_jsonl)
    with torch.no_grad():
        want = run.model(**sample.inputs, use_cache=False).logits
        got = reloaded(**sample.inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "scheme"), [("gptq", "w4a16"), ("tlq", "w4a8")])
def test_moe_export_reload_equals_the_calibrated_model(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, method, scheme):
    """Qwen3.5 MoE: routed experts per expert, the shared expert as a plain MLP, router and shared-expert
    gate 16-bit; the reload matches the calibrated model only with tlq's reload (experts restored, and
    per-token activation scales on the shared expert's flattened tokens)."""
    from tlq.export.reload import load_quantized, restore_routed_experts
    from tlq.models.tiny import TINY_MOE

    cfg = build_config(scheme, method, num_samples=4, device="cpu", search_grid=4, gptq_min_tokens=1, gptq_min_tokens_in=1)
    run = calibrate(tiny_vlm_dir("qwen3_5_moe"), tiny_calib_jsonl, cfg, progress=False)
    names = set(run.result.quantized)
    experts = TINY_MOE["num_experts"]
    assert len(names) == (3 + 3 + 3 * experts) + (4 + 3 + 3 * experts)  # linear-attention layer, full-attention layer
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate", "in_proj_a", "in_proj_b")) for n in names)
    assert any(".mlp.shared_expert.up_proj" in n for n in names)
    mlp_alphas = {k for k in run.result.layers[0].search_alphas if k.startswith("mlp.")} if method == "tlq" else set()
    assert method != "tlq" or "mlp.shared_expert.up_proj" in mlp_alphas
    write_output(run, None, tmp_path / "q", overwrite=False)
    sample = _sample(run.adapter, run.model, run.processor, tiny_calib_jsonl)
    reloaded = load_quantized(tmp_path / "q", run.adapter.spec.model_class, torch.device("cpu"), torch.float32, adapter=run.adapter)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    restore_routed_experts(plain, tmp_path / "q", run.adapter)  # experts as tlq's reload has them, nothing else
    with torch.no_grad():
        want = run.model(**sample.inputs, use_cache=False).logits
        torch.testing.assert_close(reloaded(**sample.inputs, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
        off = (plain(**sample.inputs, use_cache=False).logits - want).abs().max()
    if scheme == "w4a8":  # compressed-tensors gives the shared expert's 2-D input one scale per tensor
        assert off > 1e-4
    else:
        assert off < 1e-5
