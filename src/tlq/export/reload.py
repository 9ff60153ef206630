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

import contextlib
import json
import re
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


def load_quantized(out_dir: Path, model_class: str, device: torch.device, dtype: torch.dtype, adapter: Any = None) -> nn.Module:
    """The exported checkpoint in transformers (see the module docstring); with the family's ``adapter``,
    also its routed experts (:func:`restore_routed_experts`), which transformers alone does not load."""
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
        # per-expert keys are restored below: transformers' table of them as unexpected (and of the fused
        # parameters as missing) is expected then, and restore_routed_experts checks every one
        quiet = adapter is not None and _has_routed_experts(out_dir)
        with _quiet_transformers() if quiet else contextlib.nullcontext():
            model = cls.from_pretrained(str(out_dir), **kwargs)
    decompress_now(model)
    per_token_on_flat_inputs(model)
    if adapter is not None:
        restore_routed_experts(model, out_dir, adapter)
    return model.to(device).eval()


def per_token_on_flat_inputs(model: nn.Module) -> int:
    """Make compressed-tensors' dynamic per-token activation quantization per token on 2-D inputs too.

    Why: compressed-tensors (0.20) keeps dims 0 and 1 of the input for its ``token`` strategy and
    reduces over the rest, so a linear called on flattened tokens ``[tokens, features]`` (a MoE block's
    shared expert) gets *one* scale for the whole tensor. vLLM, and the calibration, quantize each
    token's row on its own. A pre-hook lifts such a 2-D input to ``[1, tokens, features]`` and a
    forward hook drops the added dim again: the linear's arithmetic is unchanged, the scales become per
    token. Returns how many linears were hooked (those with dynamic per-token input activations).
    """
    count = 0
    for mod in model.modules():
        acts = getattr(getattr(mod, "quantization_scheme", None), "input_activations", None)
        if not isinstance(mod, nn.Linear) or acts is None or not acts.dynamic or getattr(acts.strategy, "value", acts.strategy) != "token":
            continue
        mod.register_forward_pre_hook(_lift, prepend=True)
        mod.register_forward_hook(lambda m, _args, out: _drop(m, out))
        count += 1
    return count


def _lift(mod: nn.Module, args: tuple) -> tuple | None:
    """Flattened tokens -> one batch of them (the flag tells :func:`_drop` to undo it)."""
    mod._tlq_lifted = bool(args) and args[0].ndim == 2
    return (args[0].unsqueeze(0), *args[1:]) if mod._tlq_lifted else None


def _drop(mod: nn.Module, out: torch.Tensor) -> torch.Tensor | None:
    return out.squeeze(0) if getattr(mod, "_tlq_lifted", False) else None


def _has_routed_experts(out_dir: Path) -> bool:
    from safetensors import safe_open

    for file in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if any(ROUTED_KEY.search(k) for k in f.keys()):
                return True
    return False


ROUTED_KEY = re.compile(r"\.experts\.\d+\.\w+\.weight_(packed|scale)$")


class _quiet_transformers:
    """Raise transformers' log level to errors for a block (its load report)."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)


def restore_routed_experts(model: nn.Module, out_dir: Path, adapter: Any) -> list[str]:
    """Load the per-expert quantized linears of a MoE export into ``model``; returns their names.

    Why: the export stores experts the way vLLM's MoE loaders read quantized checkpoints, one module per
    expert (``mlp.experts.{e}.gate_proj.weight_packed`` ...). transformers 5.24 has no conversion from
    those keys to its fused ``experts.gate_up_proj`` for Qwen3-VL-MoE (only from the hub's fused,
    transposed layout), so ``from_pretrained`` leaves the experts at their random initialisation and says
    so only in a warning table. Here the adapter unfuses the experts into per-expert linears (the
    calibration's own structure), each gets its stored codes dequantized (the values calibration chose,
    exactly) and, for a W-A scheme, the dynamic per-token input quantizer calibration ran with. Every
    expert linear must be found in the checkpoint.
    """
    from compressed_tensors.quantization import QuantizationConfig

    from tlq.export.compressed_tensors import iter_stored_weights, quant_scheme_from_ct
    from tlq.models.moe import RoutedLinear
    from tlq.quant.quantizer import QuantizedWeight, add_input_quantizer

    if not adapter.unfuse(model):
        return []
    routed = {name: m for name, m in model.named_modules() if isinstance(m, RoutedLinear)}
    qcfg = QuantizationConfig.model_validate(json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"])
    scheme = quant_scheme_from_ct(next(iter(qcfg.config_groups.values())))
    spec, act = scheme.weights, scheme.activations
    found = []
    for name, stored in iter_stored_weights(out_dir):
        mod = routed.get(name)
        if mod is None:
            continue
        zero = stored.zero_point if stored.zero_point is not None else torch.zeros_like(stored.scale, dtype=torch.int8)
        qw = QuantizedWeight(stored.codes, stored.scale, zero, spec)
        with torch.no_grad():
            mod.weight.copy_(qw.dequantize(mod.weight.dtype))
        if act is not None:
            add_input_quantizer(mod, act)
        found.append(name)
    missing = sorted(set(routed) - set(found))
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} expert linears have no stored weights (e.g. {missing[0]}); was it exported by tlq?")
    return found


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
