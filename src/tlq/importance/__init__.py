"""Token importance: the layer-wise gradient pass, robust weights, the token-level calibration set.

Typical use (``weight_fn()`` is the engine's ``token_weights`` callback)::

    from tlq.importance import ImportanceConfig, SelectionConfig, build_token_calibration_set
    tcs = build_token_calibration_set(adapter, model, samples, ImportanceConfig(), SelectionConfig())
    engine = LayerwiseEngine(adapter, model, config, device, token_weights=tcs.weight_fn())

``run_importance`` writes a report (tensors, JSON summary, one PNG per sample) for inspection.
"""

from tlq.importance.calibset import (
    SelectionConfig,
    TokenCalibrationSet,
    build_token_calibration_set,
    sample_valid_mask,
    select_tokens,
)
from tlq.importance.gradients import TokenGradients, layerwise_token_gradients, token_gradients
from tlq.importance.visualize import render_sample, run_importance
from tlq.config import IMPORTANCE_KINDS as KINDS
from tlq.config import ImportanceConfig
from tlq.importance.weights import integrate, modality_mean

__all__ = [
    "KINDS",
    "ImportanceConfig",
    "SelectionConfig",
    "TokenCalibrationSet",
    "TokenGradients",
    "build_token_calibration_set",
    "integrate",
    "layerwise_token_gradients",
    "modality_mean",
    "render_sample",
    "run_importance",
    "sample_valid_mask",
    "select_tokens",
    "token_gradients",
]
