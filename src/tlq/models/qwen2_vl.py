"""Qwen2-VL and Qwen2.5-VL (transformers 5.x layout: ``model.model.{visual,language_model}``)."""

from __future__ import annotations

import torch
from torch import nn

from tlq.models.base import ModelAdapter, ModelSpec

_QWEN_IGNORE = ("re:.*visual.*", "lm_head")

QWEN2_VL = ModelSpec(
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=_QWEN_IGNORE,
)

QWEN2_5_VL = ModelSpec(
    family="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=_QWEN_IGNORE,
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
