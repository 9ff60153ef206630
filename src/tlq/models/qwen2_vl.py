"""Qwen2-VL and Qwen2.5-VL (transformers 5.x layout: ``model.model.{visual,language_model}``)."""

from __future__ import annotations

import torch
from torch import nn

from tlq.models.base import ModelAdapter, ModelSpec, SmoothMapping

# Everything under ``model.visual`` (vision tower, patch merger, Qwen3-VL's DeepStack mergers) and the LM head.
QWEN_IGNORE = ("re:.*visual.*", "lm_head")

# The Qwen2 decoder layer (also LLaVA-OneVision's language model). v_proj -> o_proj only folds without
# grouped-query attention (equal widths); the engine skips mappings whose shapes do not fold.
# Blocks: o_proj is the attention's last op and down_proj the MLP's, so each is its block's output; the
# MLP's output is added straight to the layer output (out = h + mlp(post_attention_layernorm(h))).
# The MLP and o_proj act on each token's row alone (rowwise); the attention block mixes tokens.
QWEN2_DECODER_SMOOTHING = (
    SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), block="self_attn"),
    SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), block="self_attn.o_proj", rowwise=True),
    SmoothMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), block="mlp", block_ends_layer=True, rowwise=True),
    SmoothMapping("mlp.up_proj", ("mlp.down_proj",), block="mlp.down_proj", block_ends_layer=True, rowwise=True),
)

QWEN2_VL = ModelSpec(
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=QWEN_IGNORE,
    smooth_mappings=QWEN2_DECODER_SMOOTHING,
    lmms_eval_model="qwen2_vl",
)

QWEN2_5_VL = ModelSpec(
    family="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=QWEN_IGNORE,
    smooth_mappings=QWEN2_DECODER_SMOOTHING,
    lmms_eval_model="qwen2_5_vl",
)


class QwenVLAdapter(ModelAdapter):
    """The processor's ``mm_token_type_ids`` (1 = image token) is the modality mask.

    The Qwen2-VL forward also needs it to build M-RoPE positions, so it is always present in the
    inputs built by the processor.
    """

    def visual_mask(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mm = inputs.get("mm_token_type_ids")
        if mm is not None:
            return mm != 0
        return super().visual_mask(model, inputs)

    def visual_token_grid(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, int] | None:
        """The first image's merged-token grid: ``image_grid_thw`` (t, h, w) in patches (14 px for
        Qwen2/2.5-VL, 16 px for Qwen3-VL: ``vision_config.patch_size``), merged
        ``m x m`` (``vision_config.spatial_merge_size``, 2) -> ``(h // m, w // m)``, row-major."""
        thw = inputs.get("image_grid_thw")
        if thw is None or thw.numel() == 0:
            return None
        merge = int(getattr(model.config.vision_config, "spatial_merge_size", 2))
        _t, h, w = (int(v) for v in thw.reshape(-1, 3)[0])
        return h // merge, w // merge
