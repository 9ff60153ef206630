"""TLQ: Token-level Importance-aware Layer-wise Quantization for vision-language models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def quantize(*args: Any, **kwargs: Any) -> Any:
    """Quantize a VLM checkpoint; see :func:`tlq.api.quantize` (imported lazily: torch is heavy)."""
    from tlq.api import quantize as _quantize

    return _quantize(*args, **kwargs)


__all__ = ["__version__", "quantize"]
