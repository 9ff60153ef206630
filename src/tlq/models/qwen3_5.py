"""Qwen3.5 (dense; transformers 5.x layout ``model.model.{visual,language_model}``): a hybrid decoder.

What differs from Qwen3-VL, for TLQ:

* Two kinds of decoder layer (``text_config.layer_types``): ``linear_attention`` layers run a Gated
  DeltaNet (``linear_attn``: ``in_proj_qkv``, ``in_proj_z``, the per-head ``in_proj_a`` / ``in_proj_b``,
  a depthwise causal ``conv1d``, a gated RMSNorm, ``out_proj``); ``full_attention`` layers run gated
  attention (``q_proj`` yields the query and a sigmoid gate on the output). Each kind gets its own
  attention mask from the text model (a causal mask, or the recurrent layers' padding mask), so the
  standalone replay needs both: a pre-hook on the text model records the arguments it builds them from
  and :meth:`Qwen3_5Adapter.layer_kwargs` hands each layer its kind's mask, built by transformers' own
  mask functions with those arguments.
* RMSNorms multiply by ``(1 + w)``: folding ``1/s`` into a norm is ``w -> (1 + w) / s - 1``
  (``SmoothMapping.prev_offset``), not ``w / s``.
* ``in_proj_a`` / ``in_proj_b`` (one output per value head: the delta rule's decay and beta) stay 16-bit:
  they are ~0.2% of a layer's weights, and vLLM fuses them into one small ``in_proj_ba`` whose
  tensor-parallel shards fall below its int4 kernels' minimum width. They read the same normed input as
  ``in_proj_qkv`` / ``in_proj_z``, so a scale folded into that norm is folded into their columns too
  (``SmoothMapping.passive``).
* Not folded: the gated RMSNorm before ``out_proj`` (its weight is shared by all heads, so no
  per-channel scale of ``out_proj``'s input can be absorbed there). The gated attention's ``v_proj ->
  o_proj`` folds exactly (the sigmoid gate multiplies per channel, which commutes with a per-channel
  scale) wherever the widths allow it (no grouped-query attention).
* No DeepStack: nothing happens between decoder layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tlq.models.base import ModelSpec, SmoothMapping
from tlq.models.qwen2_vl import QWEN_IGNORE, QwenVLAdapter

LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"
_MASKS, _LAYER_TYPES = "qwen3_5_masks", "qwen3_5_layer_types"  # LayerInputs.between keys

_MLP = (
    SmoothMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), block="mlp", block_ends_layer=True, rowwise=True, prev_offset=1.0),
    SmoothMapping("mlp.up_proj", ("mlp.down_proj",), block="mlp.down_proj", block_ends_layer=True, rowwise=True),
)
SMOOTHING_BY_LAYER_TYPE: dict[str, tuple[SmoothMapping, ...]] = {
    LINEAR_ATTENTION: (
        SmoothMapping("input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), block="linear_attn",
                      passive=("linear_attn.in_proj_a", "linear_attn.in_proj_b"), prev_offset=1.0),
        *_MLP,
    ),
    FULL_ATTENTION: (
        SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), block="self_attn", prev_offset=1.0),
        SmoothMapping("self_attn.v_proj", ("self_attn.o_proj",), block="self_attn.o_proj", rowwise=True),
        *_MLP,
    ),
}
"""Scale-migration mappings per kind of decoder layer (``text_config.layer_types``)."""

QWEN3_5 = ModelSpec(
    family="qwen3_5",
    model_types=("qwen3_5",),
    model_class="Qwen3_5ForConditionalGeneration",
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    ignore=(*QWEN_IGNORE, "re:.*linear_attn[.]in_proj_[ab]$"),
    smooth_mappings=SMOOTHING_BY_LAYER_TYPE[FULL_ATTENTION],
    lmms_eval_model="qwen3_vl",  # lmms-eval's qwen3_vl model class loads through AutoModelForImageTextToText
)


class Qwen3_5Adapter(QwenVLAdapter):
    """Qwen2-VL's token handling, per-kind layer masks and mappings."""

    def check_supported(self, model: nn.Module) -> None:
        """Mixed ``layer_types`` are this family's design (each kind gets its own mask): nothing to refuse."""

    def _text_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.spec.decoder_layers.rpartition(".")[0])

    def record_between(self, model: nn.Module, record: dict[str, Any]) -> list[torch.utils.hooks.RemovableHandle]:
        """Build each kind's mask as the text model does (transformers' own mask functions, on the
        arguments the text model is called with), once per sample; :meth:`layer_kwargs` hands them out."""
        text = self._text_model(model)

        def hook(mod: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
            from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

            position_ids = kwargs.get("position_ids")
            if position_ids is not None and position_ids.ndim == 3:  # [4, b, s]: text row first, as the text model splits it
                position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
            args = {"config": mod.config, "inputs_embeds": kwargs["inputs_embeds"], "attention_mask": kwargs.get("attention_mask"),
                    "cache": None, "position_ids": position_ids}
            record[_MASKS] = {FULL_ATTENTION: create_causal_mask(**args), LINEAR_ATTENTION: create_recurrent_attention_mask(**args)}
            record[_LAYER_TYPES] = list(mod.config.layer_types)

        return [text.register_forward_pre_hook(hook, with_kwargs=True)]

    def layer_kwargs(self, index: int, kwargs: dict[str, Any], between: dict[str, Any]) -> dict[str, Any]:
        """Layer ``index``'s keyword arguments: its kind's attention mask in place of layer 0's."""
        masks = between.get(_MASKS)
        if masks is None:
            return kwargs
        mask = masks[between[_LAYER_TYPES][index]]
        if isinstance(mask, torch.Tensor):
            ref = kwargs["position_embeddings"][0]
            mask = mask.to(ref.device)
        return {**kwargs, "attention_mask": mask}

    def smooth_mappings(self, layer: nn.Module) -> tuple[SmoothMapping, ...]:
        return SMOOTHING_BY_LAYER_TYPE[layer.block_type]
