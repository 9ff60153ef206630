"""benchmarks/cost.py's released shapes: every SHAPES value reaches the checkpoint's config.json and processor config
(built here at reduced widths, with the released heads, head widths, rope, layer pattern and vision fields), depth cuts
keep widths and experts, and ``--stream`` reaches the ``tlq quantize`` command line."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any

import pytest
from PIL import Image

from tlq.models.tiny import build_tokenizer, make_tiny_vlm, mrope_section

#: The shapes added beside Qwen2-VL's, with the released values the benchmark must carry (restated here from the
#: released config.json / preprocessor_config.json copies, so that an edit of SHAPES that changes one fails a test).
RELEASED: dict[str, dict[str, Any]] = {
    "qwen3-vl-8b": {"family": "qwen3_vl", "layers": 36, "hidden_size": 4096, "intermediate_size": 12288, "num_heads": 32, "num_kv_heads": 8,
                    "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 5e6, "mrope_split": [24, 20, 20],
                    "max_position_embeddings": 262144, "vision_depth": 27, "vision_hidden": 1152, "vision_intermediate_size": 4304,
                    "vision_heads": 16, "vision_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                    "min_pixels": 65536, "max_pixels": 16777216},
    "qwen3-vl-30b-a3b": {"family": "qwen3_vl_moe", "layers": 48, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                         "num_experts_per_tok": 8, "mlp_only_layers": [], "num_heads": 32, "num_kv_heads": 4, "head_dim": 128,
                         "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 5e6, "mrope_split": [24, 20, 20],
                         "max_position_embeddings": 262144, "vision_depth": 27, "vision_hidden": 1152, "vision_intermediate_size": 4304,
                         "vision_heads": 16, "vision_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                         "min_pixels": 65536, "max_pixels": 16777216},
    "qwen3.5-0.8b": {"family": "qwen3_5", "layers": 24, "hidden_size": 1024, "intermediate_size": 3584, "num_heads": 8, "num_kv_heads": 2,
                     "head_dim": 256, "vocab_size": 248320, "tie_word_embeddings": True, "rope_theta": 1e7, "mrope_split": [11, 11, 10],
                     "partial_rotary_factor": 0.25, "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
                     "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144,
                     "vision_depth": 12, "vision_hidden": 768, "vision_intermediate_size": 3072, "vision_heads": 12,
                     "vision_position_embeddings": 2304, "min_pixels": 65536, "max_pixels": 16777216},
    "qwen3.5-35b-a3b": {"family": "qwen3_5_moe", "layers": 40, "hidden_size": 2048, "moe_intermediate_size": 512, "num_experts": 256,
                        "num_experts_per_tok": 8, "shared_expert_intermediate_size": 512, "num_heads": 16, "num_kv_heads": 2, "head_dim": 256,
                        "vocab_size": 248320, "tie_word_embeddings": False, "rope_theta": 1e7, "mrope_split": [11, 11, 10],
                        "partial_rotary_factor": 0.25, "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144,
                        "vision_depth": 27, "vision_hidden": 1152, "vision_intermediate_size": 4304, "vision_heads": 16,
                        "vision_position_embeddings": 2304, "min_pixels": 65536, "max_pixels": 16777216},
    "qwen2.5-vl-3b": {"family": "qwen2_5_vl", "layers": 36, "hidden_size": 2048, "intermediate_size": 11008, "num_heads": 16, "num_kv_heads": 2,
                      "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 128000,
                      "vision_depth": 32, "vision_hidden": 1280, "vision_intermediate_size": 3420, "vision_heads": 16, "vision_window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "min_pixels": 3136, "max_pixels": 12845056},
    "qwen2.5-vl-7b": {"family": "qwen2_5_vl", "layers": 28, "hidden_size": 3584, "intermediate_size": 18944, "num_heads": 28, "num_kv_heads": 4,
                      "vocab_size": 152064, "tie_word_embeddings": False, "rope_theta": 1e6, "max_position_embeddings": 128000,
                      "vision_depth": 32, "vision_hidden": 1280, "vision_intermediate_size": 3420, "vision_heads": 16, "vision_window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "min_pixels": 3136, "max_pixels": 12845056},
    "llava-onevision-0.5b": {"family": "llava_onevision", "layers": 24, "hidden_size": 896, "intermediate_size": 4864, "num_heads": 14,
                             "num_kv_heads": 2, "vocab_size": 152000, "tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 32768,
                             "vision_depth": 26, "vision_hidden": 1152, "vision_intermediate_size": 4304, "vision_heads": 16, "image_size": 384,
                             "vision_feature_layer": -1, "vision_aspect_ratio": "anyres_max_9",
                             "grid_pinpoints": [[h, w] for h in (384, 768, 1152, 1536, 1920, 2304) for w in (384, 768, 1152, 1536, 1920, 2304)]},
    "llava-onevision-7b": {"family": "llava_onevision", "layers": 28, "hidden_size": 3584, "intermediate_size": 18944, "num_heads": 28,
                           "num_kv_heads": 4, "vocab_size": 152128, "tie_word_embeddings": False, "rope_theta": 1e6, "max_position_embeddings": 32768,
                           "vision_depth": 26, "vision_hidden": 1152, "vision_intermediate_size": 4304, "vision_heads": 16, "image_size": 384,
                           "vision_feature_layer": -1, "vision_aspect_ratio": "anyres_max_9",
                           "grid_pinpoints": [[h, w] for h in (384, 768, 1152, 1536, 1920, 2304) for w in (384, 768, 1152, 1536, 1920, 2304)]},
}
#: Widths a unit test can afford, replacing the released ones (heads, head widths, rope and layer pattern stay). The
#: text width is the smallest multiple of 128 that the released head count divides (128, or 896 for 14 / 28 heads).
_SMALL_WIDTHS = {"intermediate_size": 256, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256,
                 "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 512, "vision_intermediate_size": 256}
#: ViT width per head in the reduced build (the released head counts stay).
_SMALL_VISION_HEAD_DIM = 8
#: make_tiny_vlm keyword -> its place in config.json (text_config, vision_config or top level).
_TEXT_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
                "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
                "max_position_embeddings": "max_position_embeddings", "moe_intermediate_size": "moe_intermediate_size",
                "num_experts_per_tok": "num_experts_per_tok", "shared_expert_intermediate_size": "shared_expert_intermediate_size",
                "mlp_only_layers": "mlp_only_layers", "linear_num_key_heads": "linear_num_key_heads",
                "linear_num_value_heads": "linear_num_value_heads", "linear_key_head_dim": "linear_key_head_dim",
                "linear_value_head_dim": "linear_value_head_dim", "linear_conv_kernel_dim": "linear_conv_kernel_dim"}
_ROPE_FIELDS = {"rope_theta": "rope_theta", "mrope_split": "mrope_section", "partial_rotary_factor": "partial_rotary_factor"}
_VISION_FIELDS = {"vision_depth": "depth", "vision_hidden": "hidden_size", "vision_intermediate_size": "intermediate_size",
                  "vision_heads": "num_heads", "vision_position_embeddings": "num_position_embeddings",
                  "deepstack_visual_indexes": "deepstack_visual_indexes", "vision_window_size": "window_size",
                  "fullatt_block_indexes": "fullatt_block_indexes"}
#: LLaVA-OneVision's vision_config is a SiglipVisionConfig: the same keywords under SigLIP's names.
_SIGLIP_FIELDS = {"vision_depth": "num_hidden_layers", "vision_hidden": "hidden_size", "vision_intermediate_size": "intermediate_size",
                  "vision_heads": "num_attention_heads", "image_size": "image_size"}
#: Keywords saved at the top level of config.json.
_TOP_FIELDS = {"tie_word_embeddings": "tie_word_embeddings", "grid_pinpoints": "image_grid_pinpoints",
               "vision_feature_layer": "vision_feature_layer", "vision_aspect_ratio": "vision_aspect_ratio"}
#: Visual tokens of one 448 x 448 image (the benchmark's default calibration size; see cost.py's docstring).
_TOKENS_AT_448 = {"qwen2_5_vl": 256, "qwen3_vl": 196, "qwen3_vl_moe": 196, "qwen3_5": 196, "qwen3_5_moe": 196,
                  "llava_onevision": 729 + 54 * 54 + 54}


@pytest.fixture(scope="module")
def cost(benchmark):
    return benchmark("cost")


@pytest.mark.parametrize("shape", sorted(RELEASED))
def test_shape_holds_the_released_values_and_cuts_only_depth(cost, shape):
    released = dict(RELEASED[shape])
    family, kwargs = cost.shape_kwargs(shape, 1)
    assert family == released.pop("family")
    assert kwargs.pop("num_layers") == 1 and cost.SHAPES[shape]["layers"] == released.pop("layers")
    for key, value in released.items():
        assert kwargs.pop(key) == value, key
    assert not kwargs, f"SHAPES[{shape!r}] has values this test does not check: {kwargs}"


@pytest.mark.parametrize("shape", sorted(RELEASED))
def test_every_shape_key_is_a_builder_keyword(cost, shape):
    params = inspect.signature(make_tiny_vlm).parameters
    _family, kwargs = cost.shape_kwargs(shape, 1)
    assert set(kwargs) <= set(params), set(kwargs) - set(params)


def test_qwen2_shapes_build_as_before(cost):
    """The Qwen2-VL entries still give make_tiny_vlm what build_checkpoint gave it before the Qwen3.x shapes."""
    for shape in ("qwen2-vl-2b", "qwen2-vl-7b"):
        before = {k: v for k, v in cost.SHAPES[shape].items() if k not in ("family", "layers")}
        assert cost.shape_kwargs(shape, 2) == ("qwen2_vl", {**before, "num_layers": 2})
        assert cost.shape_kwargs(shape, 2, 3) == ("qwen2_vl", {**before, "num_layers": 2, "vision_depth": 3})


def test_vision_cut_keeps_deepstack_at_relative_depths(cost):
    assert cost.shape_kwargs("qwen3-vl-8b", 1)[1]["deepstack_visual_indexes"] == [8, 16, 24]
    assert cost.shape_kwargs("qwen3-vl-8b", 1, 9)[1]["deepstack_visual_indexes"] == [2, 5, 8]
    _family, one = cost.shape_kwargs("qwen3-vl-30b-a3b", 1, 1)
    assert (one["vision_depth"], one["deepstack_visual_indexes"]) == (1, [0])
    assert "deepstack_visual_indexes" not in cost.shape_kwargs("qwen3.5-35b-a3b", 1, 1)[1]


def test_vision_cut_keeps_full_attention_blocks_at_relative_depths(cost):
    assert cost.shape_kwargs("qwen2.5-vl-7b", 1)[1]["fullatt_block_indexes"] == [7, 15, 23, 31]
    assert cost.shape_kwargs("qwen2.5-vl-7b", 1, 16)[1]["fullatt_block_indexes"] == [3, 7, 11, 15]
    assert cost.shape_kwargs("qwen2.5-vl-3b", 1, 8)[1]["fullatt_block_indexes"] == [1, 3, 5, 7]
    assert cost.shape_kwargs("qwen2.5-vl-3b", 1, 1)[1]["fullatt_block_indexes"] == [0]
    _family, llava = cost.shape_kwargs("llava-onevision-0.5b", 1, 1)
    assert (llava["vision_depth"], llava["vision_feature_layer"]) == (1, -1)


@pytest.mark.parametrize("shape", ["qwen2.5-vl-3b", "qwen2.5-vl-7b"])
def test_qwen2_5_vl_head_width_gives_the_released_mrope_split(cost, shape):
    """Qwen2.5-VL's text config has no head_dim: the builder derives the M-RoPE split from hidden / heads, and at the
    released width that is the released rope_scaling.mrope_section."""
    s = cost.SHAPES[shape]
    assert s["hidden_size"] // s["num_heads"] == 128 and mrope_section(128) == [16, 24, 24]


@pytest.mark.parametrize(("family", "keyword", "value"), [
    ("qwen2_vl", "fullatt_block_indexes", [0]), ("llava_onevision", "vision_window_size", 112),
    ("qwen2_5_vl", "vision_feature_layer", -1), ("qwen3_vl", "vision_aspect_ratio", "anyres_max_9")])
def test_new_keywords_are_refused_by_other_families(tmp_path, family, keyword, value):
    with pytest.raises(ValueError, match=f"{keyword}: only for families"):
        make_tiny_vlm(family, tmp_path, **{keyword: value})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("layers", "vision_depth"), [(0, None), (41, None), (1, 0), (1, 28)])
def test_cuts_beyond_the_release_are_refused(cost, layers, vision_depth):
    with pytest.raises(ValueError, match="--layers|--vision-depth"):
        cost.shape_kwargs("qwen3.5-35b-a3b", layers, vision_depth)


@pytest.mark.parametrize("shape", sorted(RELEASED))
def test_reduced_build_writes_every_value_into_config(cost, shape, tmp_path):
    """Build ``shape`` at unit-test widths (one full-attention period of layers, one ViT block) and read every
    keyword back from the saved config and processor: the builder drops none and fakes none. The processor then
    turns a 448-px image into the released token count."""
    from transformers import AutoProcessor

    family, kwargs = cost.shape_kwargs(shape, RELEASED[shape].get("full_attention_interval", 1), 1)
    kwargs.update({k: v for k, v in _SMALL_WIDTHS.items() if k in kwargs}, hidden_size=math.lcm(128, kwargs["num_heads"]),
                  vision_hidden=_SMALL_VISION_HEAD_DIM * kwargs["vision_heads"])
    make_tiny_vlm(family, tmp_path, tokenizer=build_tokenizer(None, family), **kwargs)
    config = json.loads((tmp_path / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    vision_fields = _SIGLIP_FIELDS if family == "llava_onevision" else _VISION_FIELDS

    def config_value(key: str) -> Any:
        if key in _TOP_FIELDS:
            return config[_TOP_FIELDS[key]]
        if key == "num_experts":  # saved under its transformers alias in Qwen3-VL MoE
            return text.get("num_experts", text.get("num_local_experts"))
        if key in _ROPE_FIELDS:
            return text["rope_parameters"][_ROPE_FIELDS[key]]
        if key in vision_fields:
            return vision[vision_fields[key]]
        if key == "full_attention_interval":  # written as the layer pattern
            kinds = text["layer_types"]
            return next(i + 1 for i, kind in enumerate(kinds) if kind == "full_attention") if kinds.count("full_attention") == 1 else None
        if key in ("min_pixels", "max_pixels"):
            return processor["image_processor"]["size"]["shortest_edge" if key == "min_pixels" else "longest_edge"]
        return text[_TEXT_FIELDS[key]]

    wrong = {k: (v, config_value(k)) for k, v in kwargs.items() if config_value(k) != v}
    assert not wrong, wrong
    if family == "llava_onevision":  # the processor carries the tile, the anyres grid and budget too
        s, image_processor = kwargs["image_size"], processor["image_processor"]
        assert image_processor["size"] == {"height": s, "width": s} and image_processor["image_grid_pinpoints"] == kwargs["grid_pinpoints"]
        assert processor["vision_aspect_ratio"] == kwargs["vision_aspect_ratio"] and processor["num_image_tokens"] == (s // 14) ** 2 == 729
        assert (vision["patch_size"], vision["vision_use_head"], config["vision_feature_select_strategy"]) == (14, False, "full")
        assert text["tie_word_embeddings"] == kwargs["tie_word_embeddings"]
    else:
        assert vision["out_hidden_size"] == text["hidden_size"]
        patch = 14 if family == "qwen2_5_vl" else 16
        assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (patch, 2, 2)
    if family in ("qwen3_5", "qwen3_5_moe"):
        assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]

    # The processor settings are the released ones (reduced widths change none): one 448 x 448 image gives the visual
    # token count cost.py's docstring states.
    hf_processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_processor(text=[prompt], images=[Image.new("RGB", (448, 448), (120, 30, 200))], return_tensors="pt")
    image_token = hf_processor.tokenizer.convert_tokens_to_ids("<image>" if family == "llava_onevision" else "<|image_pad|>")
    assert int((inputs["input_ids"] == image_token).sum()) == _TOKENS_AT_448[family]



def test_stream_reaches_the_quantize_command(cost, monkeypatch, tmp_path):
    seen: list[list[str]] = []
    layer = {"rel_error": 0.5, "peak_mem_mb": 1.0, "routed_tokens": {}, "rtn_fallback": []}  # as a dense model's report has them

    def fake_timed(cmd: list[str]) -> tuple[None, float, float]:
        seen.append(cmd)
        (tmp_path / "gptq.json").write_text(json.dumps({"layers": [layer], "phases": {}, "num_tokens": 1}))
        return None, 1.0, 1.0

    monkeypatch.setattr(cost, "_timed", fake_timed)
    cost.run_method(tmp_path / "m", tmp_path / "c.jsonl", "w4a16", "gptq", 1, tmp_path)
    cost.run_method(tmp_path / "m", tmp_path / "c.jsonl", "w4a16", "gptq", 1, tmp_path, stream=True)
    assert "--stream" not in seen[0] and seen[1][-1] == "--stream" and seen[1][:-1] == seen[0]
