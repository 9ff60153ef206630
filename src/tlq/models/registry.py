"""Find the adapter for a checkpoint from its ``config.json`` ``model_type``."""

from __future__ import annotations

from pathlib import Path

from tlq.config import ConfigError
from tlq.models.base import ModelAdapter, read_model_type
from tlq.models.llava_onevision import LLAVA_ONEVISION, LlavaOnevisionAdapter
from tlq.models.qwen2_vl import QWEN2_5_VL, QWEN2_VL, QwenVLAdapter
from tlq.models.qwen3_vl import QWEN3_VL, Qwen3VLAdapter
from tlq.models.qwen3_vl_moe import QWEN3_VL_MOE, Qwen3VLMoeAdapter
from tlq.models.qwen3_5 import QWEN3_5, Qwen3_5Adapter
from tlq.models.qwen3_5_moe import QWEN3_5_MOE, Qwen3_5MoeAdapter

_ADAPTERS: tuple[ModelAdapter, ...] = (
    QwenVLAdapter(QWEN2_VL),
    QwenVLAdapter(QWEN2_5_VL),
    Qwen3VLAdapter(QWEN3_VL),
    Qwen3VLMoeAdapter(QWEN3_VL_MOE),
    Qwen3_5Adapter(QWEN3_5),
    Qwen3_5MoeAdapter(QWEN3_5_MOE),
    LlavaOnevisionAdapter(LLAVA_ONEVISION),
)


def supported_model_types() -> list[str]:
    return [t for a in _ADAPTERS for t in a.spec.model_types]


def adapter_for_model_type(model_type: str) -> ModelAdapter:
    for adapter in _ADAPTERS:
        if model_type in adapter.spec.model_types:
            return adapter
    raise ConfigError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


def adapter_for_dir(model_dir: Path) -> ModelAdapter:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {str(model_dir)!r} does not exist; pass a local Hugging Face checkpoint")
    return adapter_for_model_type(read_model_type(model_dir))
