"""Qwen3.5 MoE (e.g. Qwen3.5-35B-A3B): Qwen3.5's hybrid decoder with a routed-plus-shared MoE block in
every layer.

* Routed experts: fused in memory (``experts.gate_up_proj`` / ``down_proj``), stored per expert in the
  released checkpoints (transformers merges them at load). Calibrated and exported per expert, as for
  Qwen3-VL MoE (:mod:`tlq.models.moe`); a streamed run reads the per-expert tensors as they are stored.
* The shared expert (``mlp.shared_expert``: gate/up/down, sees every token) is a plain MLP; its sigmoid
  gate ``mlp.shared_expert_gate`` (one output) and the router ``mlp.gate`` stay 16-bit.
* Scale migration: attention per layer kind as Qwen3.5; ``post_attention_layernorm -> every routed
  expert's and the shared expert's gate/up``, with the router's and the shared-expert gate's columns
  scaled too (:func:`tlq.models.moe.router_fold`: routing and gating unchanged); per routed expert and for
  the shared expert ``up_proj -> down_proj``.
  The MoE block's output is added to the layer output unchanged and maps each token on its own.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from tlq.models.base import SmoothMapping
from tlq.models.moe import RoutedExpertsAdapter, expert_smoothing, router_fold, without_mlp
from tlq.models.qwen3_5 import QWEN3_5, SMOOTHING_BY_LAYER_TYPE, Qwen3_5Adapter
from tlq.models.qwen3_vl_moe import ROUTER_IGNORE

QWEN3_5_MOE = replace(
    QWEN3_5,
    family="qwen3_5_moe",
    model_types=("qwen3_5_moe",),
    model_class="Qwen3_5MoeForConditionalGeneration",
    ignore=(*QWEN3_5.ignore, ROUTER_IGNORE, "re:.*mlp[.]shared_expert_gate$"),
)


class Qwen3_5MoeAdapter(RoutedExpertsAdapter, Qwen3_5Adapter):
    """Qwen3.5's masks and per-kind mappings; experts unfused at load."""

    def smooth_mappings(self, layer: nn.Module) -> tuple[SmoothMapping, ...]:
        n = len(layer.mlp.experts)
        fold = router_fold(n, shared=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), passive=("mlp.shared_expert_gate",), prev_offset=1.0)
        shared = (("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),)
        return (*without_mlp(SMOOTHING_BY_LAYER_TYPE[layer.block_type]), fold, *expert_smoothing(n, shared))
