"""Qwen3-VL MoE (e.g. Qwen3-VL-30B-A3B): Qwen3-VL's DeepStack walk plus routed experts.

What differs from dense Qwen3-VL, for TLQ:

* The MLP of a sparse layer is a top-k routed mixture (``mlp.gate``: the router, ``mlp.experts``: fused
  ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``). Layers listed in ``mlp_only_layers`` (or off
  the ``decoder_sparse_step``) keep a dense Qwen3 MLP. At load the fused experts become per-expert linears
  (:mod:`tlq.models.moe`), so each expert is calibrated on the token rows routed to it, and exported
  under the per-expert names vLLM's MoE loaders read for quantized checkpoints
  (``mlp.experts.{e}.{gate,up,down}_proj``).
* The router stays 16-bit: it is not an ``nn.Linear`` in transformers (so no quantization target) and it
  is named in the ignore list for serving stacks that build it as one.
* Scale migration: attention as in Qwen2; ``post_attention_layernorm -> every expert's gate/up`` with
  the router's columns scaled too, so routing is unchanged (:func:`tlq.models.moe.router_fold`); per
  expert, ``up_proj -> down_proj`` folds exactly (the expert's own up rows and down columns). The MoE
  block's output is added unchanged to the layer output and maps each token on its own, so a candidate's
  layer-scope loss is measured on the block alone, on the rows of the tokens inside the budget
  (``block_ends_layer``, ``rowwise``).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from tlq.models.base import SmoothMapping
from tlq.models.moe import RoutedExpertsAdapter, UnfusedExperts, expert_smoothing, router_fold, without_mlp
from tlq.models.qwen2_vl import QWEN2_DECODER_SMOOTHING, QWEN_IGNORE
from tlq.models.qwen3_vl import QWEN3_VL, Qwen3VLAdapter

ROUTER_IGNORE = "re:.*mlp[.]gate$"  # the router (a 16-bit matmul in every serving stack)

QWEN3_VL_MOE = replace(
    QWEN3_VL,
    family="qwen3_vl_moe",
    model_types=("qwen3_vl_moe",),
    model_class="Qwen3VLMoeForConditionalGeneration",
    ignore=(*QWEN_IGNORE, ROUTER_IGNORE),
    lmms_eval_model="qwen3_vl",  # lmms-eval's qwen3_vl model loads through AutoModelForImageTextToText
)

class Qwen3VLMoeAdapter(RoutedExpertsAdapter, Qwen3VLAdapter):
    """Qwen3-VL's walk; fused experts unfused at load; per-layer mappings (MoE or dense MLP)."""

    def smooth_mappings(self, layer: nn.Module) -> tuple[SmoothMapping, ...]:
        experts = getattr(layer.mlp, "experts", None)
        if not isinstance(experts, UnfusedExperts):  # a dense MLP layer (mlp_only_layers)
            return QWEN2_DECODER_SMOOTHING
        return (*without_mlp(QWEN2_DECODER_SMOOTHING), router_fold(len(experts)), *expert_smoothing(len(experts)))
