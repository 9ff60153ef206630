"""Where tlq may run float32 work's matmuls in bf16, and how.

Two passes only need their results up to rounding in principle: the scale search's candidate losses
(only which exponent wins matters) and the importance pass's gradients (only relative token weights
matter, after clipping, a floor and normalisation). Whether bf16 keeps accuracy is measured, not assumed
(docs/methods.md: the search's bf16 matmuls passed the val rule, the importance pass's did not, so no
preset uses that one). Both take a ``matmul dtype`` option from ``tlq.config.MATMUL_DTYPES``:
``"compute"`` (the run's dtype, exact), ``"bfloat16"`` or ``"auto"`` (:func:`resolve_matmul_dtype`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def resolve_matmul_dtype(name: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a GPU or a CPU with native bf16 matmuls (AVX512-BF16 or AMX), else
    ``"compute"``: elsewhere oneDNN emulates bf16 and the shortcut would cost time instead of saving it."""
    if name != "auto":
        return name
    native = device.type != "cpu" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "compute"


def matmul_autocast(name: str, device: torch.device) -> Any:
    """A context running the matmuls (linears, attention) of float32 modules in ``name``'s dtype through
    torch's autocast (its norms, softmax and reductions stay float32); a null context for ``"compute"``."""
    resolved = resolve_matmul_dtype(name, device)
    if resolved == "compute":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, resolved))
