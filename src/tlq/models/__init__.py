"""Model adapters: the only place in TLQ that knows model architectures."""

from tlq.models.base import LayerInputs, ModelAdapter, ModelSpec, run_layer, tree_to
from tlq.models.registry import adapter_for_dir, adapter_for_model_type, supported_model_types

__all__ = [
    "LayerInputs",
    "ModelAdapter",
    "ModelSpec",
    "adapter_for_dir",
    "adapter_for_model_type",
    "run_layer",
    "supported_model_types",
    "tree_to",
]
