"""LLaVA-OneVision (SigLIP vision tower + projector + Qwen2 decoder)."""

from __future__ import annotations

from tlq.models.base import ModelAdapter, ModelSpec

LLAVA_ONEVISION = ModelSpec(
    family="llava_onevision",
    model_types=("llava_onevision",),
    model_class="LlavaOnevisionForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=("re:.*vision_tower.*", "re:.*multi_modal_projector.*", "lm_head"),
)


class LlavaOnevisionAdapter(ModelAdapter):
    """Visual tokens are the expanded ``<image>`` tokens (``config.image_token_id``): the generic mask."""
