"""Reload an exported checkpoint in transformers, on the route that reproduces calibration.

transformers 5.x has two compressed-tensors routes. The default (``dequantize=False``) decompresses on
the first forward and applies the config's dynamic per-token activation quantization, which is what a
W-A kernel computes, so it is preferred. It cannot load int3 asymmetric ``pack-quantized`` weights
(the packed zero points have the wrong shape), and those have no activation quantization anyway, so
they take ``dequantize=True`` (dense weights at load time), which gives the same logits.

Checkpoints from other tools load too. llm-compressor (0.14) writes its ``ignore`` list in *checkpoint*
key names (``visual.blocks.0.attn.qkv``), while transformers 5.x matches ignore entries against the
*runtime* module names (``model.visual.blocks.0.attn.qkv``): loaded as is, the vision tower would be
quantized with the decoder's scheme (and fail on widths the group size does not divide). The entries are
translated with the renames ``from_pretrained`` itself applies to checkpoint keys before loading.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _weight_args(qcfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [g.get("weights") or {} for g in (qcfg.get("config_groups") or {}).values()]


def needs_dequantize_route(out_dir: Path) -> bool:
    """True when the default route cannot load this checkpoint (int3 asymmetric packed weights)."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    qcfg = cfg.get("quantization_config") or {}
    return any(w.get("num_bits") == 3 and not w.get("symmetric", True) for w in _weight_args(qcfg))


def runtime_ignore(cls: Any, config: Any, ignore: list[str]) -> list[str]:
    """``ignore`` with every plain entry that names a checkpoint key renamed to the runtime module name
    (``re:`` patterns and names that already exist are kept)."""
    from tlq.models.streaming import KeyRenamer

    with torch.device("meta"):
        skeleton = cls(config)
    modules = {name for name, _ in skeleton.named_modules()}
    rename = KeyRenamer(skeleton)
    out = []
    for entry in ignore:
        if entry.startswith("re:") or entry in modules:
            out.append(entry)
            continue
        key, _ = rename(f"{entry}.weight")
        renamed = key.removesuffix(".weight")
        out.append(renamed if renamed in modules else entry)
    return out


def _runtime_config(out_dir: Path, cls: Any) -> Any | None:
    """The checkpoint's config with its ignore list in runtime names, or None when nothing needs renaming."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(out_dir), local_files_only=True)
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict) or not qcfg.get("ignore"):
        return None
    fixed = runtime_ignore(cls, config, list(qcfg["ignore"]))
    if fixed == list(qcfg["ignore"]):
        return None
    config.quantization_config = {**qcfg, "ignore": fixed}
    return config


def load_quantized(out_dir: Path, model_class: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers
    from transformers import CompressedTensorsConfig

    cls = getattr(transformers, model_class)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    config = _runtime_config(out_dir, cls)
    if config is not None:
        kwargs["config"] = config
    if needs_dequantize_route(out_dir):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        # transformers warns that the passed config overrides the checkpoint's loading attributes:
        # that override (dequantize=True) is exactly the intent here.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config` attribute.*")
        model = cls.from_pretrained(str(out_dir), **kwargs)
    decompress_now(model)
    return model.to(device).eval()


def decompress_now(model: nn.Module) -> nn.Module:
    """Decompress a checkpoint loaded on the default route now instead of on its first forward.

    compressed-tensors (0.20) decompresses in a forward pre-hook of the first call and leaves every module
    wrapped in its offloading ``forward``, which rebuilds dict arguments as plain dicts. A ``ModelOutput``
    argument then loses its attributes: ``generate`` on LLaVA-OneVision passes the pre-encoded image
    features that way and fails (``'dict' object has no attribute 'pooler_output'``). Run that hook
    here, then remove the offloading wrappers (everything is on one device anyway): the result is plain
    transformers modules with compressed-tensors' quantized forwards, the same logits. A no-op for a
    model without the hook (the ``dequantize=True`` route, or other versions).
    """
    handle = getattr(model, "ct_decompress_hook", None)
    hook = None if handle is None else model._forward_pre_hooks.get(handle.id)
    if hook is None:
        return model
    hook(model, ())
    from compressed_tensors.offload import remove_dispatch

    return remove_dispatch(model, onload_tensors=True)
