"""Qwen3-VL (dense): DeepStack between decoder layers, exact smoothing folds, quantize -> export -> reload, resume.

The family-generic invariants (replay, gradients vs full back-propagation, streaming, export round trip)
run for Qwen3-VL through ``FAMILIES`` in the other test files; this file tests what only Qwen3-VL has.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tlq.api import build_config, calibrate
from tlq.data.calibration import load_calibration
from tlq.models import adapter_for_dir
from tlq.models.base import run_layer
from tlq.models.qwen3_vl import DEEPSTACK_EMBEDS, QWEN3_VL, VISUAL_POS_MASKS, Qwen3VLAdapter
from tlq.pipeline import RunOptions, load_model, write_output
from tlq.quant.scale_search import can_fold, fold_scales

FAMILY = "qwen3_vl"


def _setup(model_dir, calib, n=2):
    adapter, model, processor, *_ = load_model(model_dir, device="cpu")
    return adapter, model, processor, load_calibration(calib, processor, adapter, model, num_samples=n, max_seq_len=4096, seed=0)


def _walk_logits(adapter, model, li, step: bool) -> torch.Tensor:
    """Logits of a standalone walk from layer 0's inputs: the adapter's step, or the layers alone."""
    h = li.hidden_states
    for i, layer in enumerate(adapter.decoder_layers(model)):
        h = adapter.layer_step(i, layer, h, li.kwargs, li.between) if step else run_layer(layer, h, li.kwargs)
    return model.get_submodule(adapter.spec.lm_head)(model.get_submodule(adapter.spec.final_norm)(h))


@torch.no_grad()
def test_deepstack_is_captured_and_the_walk_needs_it(tiny_vlm_dir, tiny_calib_jsonl):
    adapter, model, _proc, samples = _setup(tiny_vlm_dir(FAMILY), tiny_calib_jsonl)
    assert isinstance(adapter, Qwen3VLAdapter)
    for sample in samples:
        li = adapter.capture_layer0_inputs(model, sample.inputs)
        embeds, mask = li.between[DEEPSTACK_EMBEDS], li.between[VISUAL_POS_MASKS]
        assert len(embeds) == len(model.config.vision_config.deepstack_visual_indexes) == 2
        assert torch.equal(mask[0], sample.visual_mask)  # the model's visual positions are the adapter's
        assert all(e.shape == (int(sample.visual_mask.sum()), model.config.text_config.hidden_size) for e in embeds)
        assert all(t.device.type == "cpu" for t in [*embeds, mask])
        expected = model(**sample.inputs, use_cache=False).logits
        torch.testing.assert_close(_walk_logits(adapter, model, li, step=True), expected, rtol=1e-5, atol=1e-5)
        # without the adapter's step the replay is silently wrong: DeepStack moves the logits
        assert (_walk_logits(adapter, model, li, step=False) - expected).abs().max() > 1e-2


@torch.no_grad()
def test_text_only_sample_adds_nothing_between_layers(tiny_vlm_dir):
    model_dir = tiny_vlm_dir(FAMILY)
    adapter, model, processor, *_ = load_model(model_dir, device="cpu")
    text = processor.apply_chat_template([{"role": "user", "content": "What color is the square?"}], add_generation_prompt=True)
    inputs = dict(processor(text=[text], return_tensors="pt"))
    li = adapter.capture_layer0_inputs(model, inputs)
    assert li.between == {}
    torch.testing.assert_close(_walk_logits(adapter, model, li, step=True), model(**inputs, use_cache=False).logits)


def test_between_layers_is_differentiable_and_identity_past_deepstack():
    adapter = Qwen3VLAdapter(QWEN3_VL)
    mask = torch.tensor([[False, True, True, False]])
    between = {DEEPSTACK_EMBEDS: [torch.ones(2, 3)], VISUAL_POS_MASKS: mask}
    h = torch.zeros(1, 4, 3, requires_grad=True)
    out = adapter.between_layers(0, h, between)
    assert torch.equal(out[0, :, 0], torch.tensor([0.0, 1.0, 1.0, 0.0])) and torch.equal(h, torch.zeros(1, 4, 3))
    (g,) = torch.autograd.grad(out, h, grad_outputs=torch.full_like(out, 2.0))
    assert torch.equal(g, torch.full_like(h, 2.0))  # the added features are constants: the gradient passes as is
    assert adapter.between_layers(1, h, between) is h


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@torch.no_grad()
def test_smoothing_mappings_fold_exactly(tiny_vlm_dir, tiny_calib_jsonl, kv_heads):
    """Folding scales into every mapping's producer and linears leaves the decoder layer's output as it was,
    q_norm / k_norm included. v_proj -> o_proj folds only without grouped-query attention."""
    adapter, model, _proc, samples = _setup(tiny_vlm_dir(FAMILY, num_kv_heads=kv_heads), tiny_calib_jsonl, n=1)
    li = adapter.capture_layer0_inputs(model, samples[0].inputs)
    layer = adapter.decoder_layers(model)[0]
    ref = run_layer(layer, li.hidden_states, li.kwargs)
    gen = torch.Generator().manual_seed(0)
    folded = []
    for mapping in adapter.spec.smooth_mappings:
        scaled = copy.deepcopy(layer)
        prev, linears = scaled.get_submodule(mapping.prev), [scaled.get_submodule(n) for n in mapping.linears]
        if not can_fold(prev, linears):
            continue
        fold_scales(prev, linears, torch.empty(linears[0].in_features).uniform_(0.25, 4.0, generator=gen))
        torch.testing.assert_close(run_layer(scaled, li.hidden_states, li.kwargs), ref, rtol=1e-5, atol=1e-5)
        folded.append(mapping.prev)
    expected = ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    assert folded == (expected if kv_heads == 4 else [p for p in expected if p != "self_attn.v_proj"])


def test_ignore_list_keeps_vision_and_deepstack_mergers_in_16_bits(tiny_vlm_dir):
    from compressed_tensors.utils import match_named_modules

    model_dir = tiny_vlm_dir(FAMILY)
    adapter = adapter_for_dir(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    targeted = {name for name, _m in match_named_modules(model, ["Linear"], list(adapter.spec.ignore))}
    decoder = {n for n, m in adapter.decoder_layers(model).named_modules() if isinstance(m, torch.nn.Linear)}
    assert targeted == {f"{adapter.spec.decoder_layers}.{n}" for n in decoder}
    assert any("deepstack_merger_list" in n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8"])
@pytest.mark.parametrize("method", ["gptq", "tlq"])
def test_quantize_export_reload_equals_the_calibrated_model(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, method, scheme):
    model_dir = tiny_vlm_dir(FAMILY)
    cfg = build_config(scheme, method, num_samples=4, device="cpu", search_grid=4)
    run = calibrate(model_dir, tiny_calib_jsonl, cfg, progress=False)
    assert len(run.result.quantized) == 14 and all(r.rel_error > 0 for r in run.result.layers)
    assert (run.token_set is not None) == (method == "tlq")
    write_output(run, None, tmp_path / "q", overwrite=False)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q").eval()
    sample = load_calibration(tiny_calib_jsonl, run.processor, run.adapter, run.model, num_samples=1, max_seq_len=4096, seed=0)[0]
    with torch.no_grad():
        want = run.model(**sample.inputs, use_cache=False).logits  # fake-quant weights (+ activation quantizers)
        got = reloaded(**sample.inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("family", [FAMILY, "qwen3_vl_moe"])
def test_resume_recaptures_what_goes_between_layers(tiny_vlm_dir, tiny_calib_jsonl, tmp_path, family):
    """A run stopped after layer 0 resumes from the saved streams and recaptured layer-0 inputs (DeepStack
    included: it is added after layer 1 of 3) and ends with the codes of an uninterrupted run; MoE: with
    the restored per-expert layer and the same per-expert token counts."""
    model_dir = tiny_vlm_dir(family, num_layers=3)
    cfg = build_config("w4a16", "gptq", num_samples=4, device="cpu")
    ref = calibrate(model_dir, tiny_calib_jsonl, cfg, progress=False)

    def crash_after_layer0(*_args):
        def sink(index, _layer, _quantized):
            if index == 0:
                raise _Crash

        return sink

    options = RunOptions(progress=False, resume_dir=tmp_path / "resume")
    states: list = []
    with pytest.raises(_Crash):
        calibrate(model_dir, tiny_calib_jsonl, cfg, options=options, sink_factory=crash_after_layer0, opened=states.append)
    states[0].close()  # what a killed process's exit does: free the directory lock
    at_open: list[int] = []
    resumed = calibrate(model_dir, tiny_calib_jsonl, cfg, options=options, opened=lambda s: at_open.append(s.completed_layers()))
    assert at_open == [1] and resumed.resume.completed_layers() == 3  # layer 0 restored, layers 1 and 2 calibrated
    assert ref.result.quantized.keys() == resumed.result.quantized.keys()
    for name, qw in ref.result.quantized.items():
        assert torch.equal(qw.codes, resumed.result.quantized[name].codes), name
    assert [r.rel_error for r in resumed.result.layers] == pytest.approx([r.rel_error for r in ref.result.layers], rel=1e-6)
    assert [r.routed_tokens for r in resumed.result.layers] == [r.routed_tokens for r in ref.result.layers]
    resumed.resume.cleanup()
