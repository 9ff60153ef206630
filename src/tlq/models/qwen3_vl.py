"""Qwen3-VL, dense (transformers 5.x layout: ``model.model.{visual,language_model}``).

What differs from Qwen2-VL, for TLQ:

* DeepStack: the vision tower also returns merged features of some intermediate vision blocks
  (``vision_config.deepstack_visual_indexes``, each through its own ``deepstack_merger_list`` merger),
  and the text model adds feature ``k`` to the hidden states at the visual positions *after* decoder
  layer ``k`` (``Qwen3VLTextModel.forward`` / ``_deepstack_process``). The standalone-layer replay
  therefore needs those features and the visual position mask: the Qwen3-VL model passes both to its
  language model as keyword arguments (``deepstack_visual_embeds``, ``visual_pos_masks``), where a
  pre-hook records them during the layer-0 capture; :meth:`Qwen3VLAdapter.between_layers` adds them.
* Per-head RMSNorms ``q_norm`` / ``k_norm`` on the *outputs* of ``q_proj`` / ``k_proj``. The smoothing
  mappings still fold exactly: input_layernorm -> q/k/v scales the linears' *input* columns and divides
  the norm weight, which leaves ``q_proj``'s output (hence ``q_norm``'s input) unchanged; v_proj ->
  o_proj touches no normed tensor (``v`` has no norm). The decoder layer is otherwise Qwen2's (o_proj and
  the MLP act on each token alone, so their ``rowwise`` blocks hold too), and the Qwen2 mappings are
  reused as they are (tested: folding random scales into each preserves the layer output).
* Vision: 16-px patches (``vision_config.patch_size``), 2x2 merge, so ``image_grid_thw`` is in 16-px
  patches; the visual-token grid is computed exactly as for Qwen2-VL, from the config's merge size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tlq.models.base import ModelSpec
from tlq.models.qwen2_vl import QWEN2_DECODER_SMOOTHING, QWEN_IGNORE, QwenVLAdapter

# Keyword arguments of ``Qwen3VLTextModel.forward`` that carry DeepStack (transformers' own names).
DEEPSTACK_EMBEDS = "deepstack_visual_embeds"
VISUAL_POS_MASKS = "visual_pos_masks"

QWEN3_VL = ModelSpec(
    family="qwen3_vl",
    model_types=("qwen3_vl",),
    model_class="Qwen3VLForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=QWEN_IGNORE,  # the vision tower, its merger and the DeepStack mergers all live under model.visual
    smooth_mappings=QWEN2_DECODER_SMOOTHING,
    lmms_eval_model="qwen3_vl",  # lmms_eval/models/simple/qwen3_vl.py (Qwen3VLForConditionalGeneration)
)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen2-VL's token handling (``mm_token_type_ids``, merged-patch grid) plus the DeepStack walk."""

    def _text_model(self, model: nn.Module) -> nn.Module:
        """The module that owns the decoder layers and is called with the DeepStack arguments."""
        return model.get_submodule(self.spec.decoder_layers.rpartition(".")[0])

    def record_between(self, model: nn.Module, record: dict[str, Any]) -> list[torch.utils.hooks.RemovableHandle]:
        """Record the DeepStack features and visual mask the text model is called with (absent for a
        sample without images: then nothing is added between layers, as in the model)."""

        def hook(_mod: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
            embeds, mask = kwargs.get(DEEPSTACK_EMBEDS), kwargs.get(VISUAL_POS_MASKS)
            if embeds is not None and mask is not None:
                record[DEEPSTACK_EMBEDS] = [e.detach() for e in embeds]
                record[VISUAL_POS_MASKS] = mask.detach()

        return [self._text_model(model).register_forward_pre_hook(hook, with_kwargs=True)]

    def between_layers(self, index: int, hidden: torch.Tensor, between: dict[str, Any]) -> torch.Tensor:
        """After decoder layer ``index < len(embeds)``, add DeepStack feature ``index`` at the visual
        positions, as ``Qwen3VLTextModel._deepstack_process`` does (out of place: differentiable)."""
        embeds = between.get(DEEPSTACK_EMBEDS)
        if not embeds or index >= len(embeds):
            return hidden
        mask = between[VISUAL_POS_MASKS].to(hidden.device)
        out = hidden.clone()
        out[mask] = hidden[mask] + embeds[index].to(hidden.device, hidden.dtype)
        return out
