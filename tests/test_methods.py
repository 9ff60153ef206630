"""Method presets end to end through ``tlq.api.calibrate``: each baseline and TLQ (with its ablations)."""

from __future__ import annotations

import pytest
import torch

from tlq.api import build_config, calibrate
from tlq.config import METHODS, ConfigError


def _run(tiny_vlm_dir, tiny_calib_jsonl, scheme, method, **kw):
    cfg = build_config(scheme, method, num_samples=4, device="cpu", search_grid=4, **kw)
    return calibrate(tiny_vlm_dir("qwen2_vl"), tiny_calib_jsonl, cfg, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_calibrates(tiny_vlm_dir, tiny_calib_jsonl, method):
    run = _run(tiny_vlm_dir, tiny_calib_jsonl, "w4a8", method)
    assert len(run.result.quantized) == 14
    assert all(layer.rel_error > 0 for layer in run.result.layers)
    assert (run.token_set is not None) == (method in ("mbq", "tlq"))


def test_tlq_draws_a_tenth_of_the_tokens(tiny_vlm_dir, tiny_calib_jsonl):
    run = _run(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "tlq", token_floor=0)  # 4 tiny samples: under the default floor
    summary = run.token_set
    assert (summary["selection"]["token_fraction"], summary["selection"]["rank"]) == (0.1, "sampled")
    cand = summary["candidate_tokens"]
    visual, text = summary["selected_tokens_per_layer"]["visual"], summary["selected_tokens_per_layer"]["text"]
    for layer_visual, layer_text in zip(visual, text):  # a systematic draw keeps exactly round(n / 10) per sample and row
        assert abs((layer_visual + layer_text) - 0.1 * (cand["visual"] + cand["text"])) <= 2
    assert 0.1 < summary["union_share"] < 1  # the layer's rows draw their own tokens, so their union is more than a tenth


def test_token_weights_change_the_solution(tiny_vlm_dir, tiny_calib_jsonl):
    plain = _run(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "gptq")
    tlq = _run(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "tlq")
    ablated = _run(tiny_vlm_dir, tiny_calib_jsonl, "w3a16", "tlq", weighting="uniform", token_select=False, scale_search="none",
                   gptq_target="quantized")
    name = next(iter(plain.result.quantized))
    assert not torch.equal(plain.result.quantized[name].codes, tlq.result.quantized[name].codes)
    # TLQ with every part switched off is exactly GPTQ
    for n, qw in plain.result.quantized.items():
        assert torch.equal(qw.codes, ablated.result.quantized[n].codes)


def test_mbq_weights_are_per_modality(tiny_vlm_dir, tiny_calib_jsonl):
    run = _run(tiny_vlm_dir, tiny_calib_jsonl, "w4a16", "mbq")
    assert run.token_set["importance"]["kind"] == "modality"
    assert run.config.search.kind == "awq" and not run.config.quantized_inputs
    assert run.config.search.scope == "block"  # AWQ's block-output loss, which MBQ builds on


def test_awq_judges_candidates_by_block_output_and_keeps_it_when_the_kind_changes():
    assert build_config("w4a16", "awq").search.scope == "block"
    assert build_config("w4a8", "awq", scale_search="smoothquant").search.scope == "block"
    assert build_config("w4a16", "awq", search_scope="layer").search.scope == "layer"


def test_unknown_parts_are_config_errors():
    with pytest.raises(ConfigError, match="solver"):
        build_config("w4a16", "gptq", solver="adam")
    with pytest.raises(ConfigError, match="weighting"):
        build_config("w4a16", "gptq", weighting="random")
    with pytest.raises(ConfigError, match="scale search"):
        build_config("w4a16", "gptq", scale_search="magic")
