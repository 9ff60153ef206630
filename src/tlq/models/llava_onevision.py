"""LLaVA-OneVision (SigLIP vision tower + projector + Qwen2 decoder)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tlq.models.base import Box, ModelAdapter, ModelSpec, grid_boxes
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

    def visual_token_boxes(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[Box | None] | None:
        """The base tile's ``g x g`` grid (the whole image resized to one tile), then the anyres grid: the
        tiles of the best pinpoint resolution side by side, the letterbox padding cut off and pooled when
        above ``anyres_max_N`` tiles' worth, each row followed by an ``image_newline`` token (no region).
        The grid's shape is computed with transformers' own ``get_anyres_image_grid_shape`` and
        ``unpad_image``, so it is the one the model packs; both grids cover the whole image."""
        base = self.visual_token_grid(model, inputs)
        sizes = inputs.get("image_sizes")
        if base is None or sizes is None:
            return None
        if inputs["pixel_values"].shape[1] <= 1:  # no anyres tiles: the base tile and one newline
            return [*grid_boxes(*base), None]
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

        cfg, g = model.config, base[0]
        hw = [int(v) for v in sizes.reshape(-1, 2)[0]]
        tiles_h, tiles_w = get_anyres_image_grid_shape(hw, cfg.image_grid_pinpoints, int(cfg.vision_config.image_size))
        _c, rows, cols = unpad_image(torch.empty(1, tiles_h * g, tiles_w * g), hw).shape
        ratio = math.sqrt(rows * cols / (int(str(cfg.vision_aspect_ratio).strip("anyres_max_")) * g * g))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        tiles = grid_boxes(rows, cols)
        return grid_boxes(*base) + [box for r in range(rows) for box in (*tiles[r * cols:(r + 1) * cols], None)]
