"""LLaVA-OneVision (SigLIP vision tower + projector + Qwen2 decoder)."""

from __future__ import annotations

import torch
from torch import nn

from tlq.models.base import ModelAdapter, ModelSpec
from tlq.models.qwen2_vl import QWEN2_DECODER_SMOOTHING

LLAVA_ONEVISION = ModelSpec(
    family="llava_onevision",
    model_types=("llava_onevision",),
    model_class="LlavaOnevisionForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=("re:.*vision_tower.*", "re:.*multi_modal_projector.*", "lm_head"),
    smooth_mappings=QWEN2_DECODER_SMOOTHING,  # its language model is a Qwen2 decoder
    # lmms-eval's "llava_onevision" class needs the LLaVA-NeXT package and lmms-lab's own layout;
    # "llava_hf" loads transformers-format checkpoints like this one.
    lmms_eval_model="llava_hf",
)


class LlavaOnevisionAdapter(ModelAdapter):
    """Visual tokens are the expanded ``<image>`` tokens (``config.image_token_id``): the generic mask."""

    def visual_token_grid(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, int] | None:
        """The base tile only: an image's first ``g * g`` tokens (``g = image_size / patch_size``) are the
        whole image resized to one ``s x s`` tile, row-major; the anyres tiles and ``image_newline``
        tokens that follow are not part of the grid (visualisations draw the base tile only)."""
        if inputs.get("pixel_values") is None:
            return None
        vc = model.config.vision_config
        g = int(vc.image_size) // int(vc.patch_size)
        return g, g
