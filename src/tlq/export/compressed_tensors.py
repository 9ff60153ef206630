"""Export a quantized model as a compressed-tensors checkpoint that transformers and vLLM load.

What is written
---------------
``out_dir`` holds ``config.json`` (with a ``quantization_config`` block), ``model.safetensors``
(sharded if large), ``generation_config.json`` and the processor / tokenizer / chat-template files
copied from the source checkpoint. Every decoder ``Linear`` is stored with *our* integer codes
(the exporter checks, after writing, that the codes read back from the saved files are exactly the
codes TLQ computed, and that the scales are the ones TLQ used). The vision tower, the projector and
the LM head stay dense (16-bit) through a regex ``ignore`` list (``re:.*visual.*``,
``re:.*vision_tower.*``, ``re:.*multi_modal_projector.*``, ``lm_head``): concrete module names would
break after transformers' checkpoint-key renames (in-memory ``model.language_model.*`` vs saved
``model.layers.*`` / ``language_model.*``), so the list is written as regexes and matched by the
same code (``compressed_tensors.utils.match_named_modules``) that the loader uses.

Formats (one config group, ``targets=["Linear"]``):

========  ==================================================  ====================
scheme    compressed-tensors layout                            format
========  ==================================================  ====================
w4a16     int4 group-128 symmetric, codes packed 8 per int32   ``pack-quantized``
w3a16     int3 group-128 asymmetric, codes and zero points     ``pack-quantized``
          densely packed across int32 words
w8a8      int8 per-channel weights + int8 dynamic per-token    ``int-quantized``
          input activations
w4a8      int4 per-channel symmetric weights packed in int32   ``pack-quantized``
          + int8 dynamic per-token input activations
========  ==================================================  ====================

w4a8 is stored ``pack-quantized`` (with ``input_activations`` in the scheme), not ``int-quantized``:
both reload in transformers 5.24 with identical logits (tried), but the packed layout is half the size
and is the layout vLLM's W4A8-int8 schemes (``CompressedTensorsW4A8Int``/``...Int8``, CPU kernels) read;
an ``int-quantized`` int4 checkpoint matches no vLLM scheme. ``ct_format=`` overrides the format
(``CT_FORMATS``): ``"naive-quantized"`` stores w3a16 codes unpacked in int8 (zero points unpacked too),
which transformers' default route does load.

Reloading (transformers 5.24, compressed-tensors 0.20) -- checked by ``tests/test_export.py``
------------------------------------------------------------------------------------------
* ``AutoModelForImageTextToText.from_pretrained(out)`` (default, ``dequantize=False``): the modules
  are built compressed, decompressed on the first forward, and the config's **dynamic per-token int8
  input quantization is applied** at every quantized linear. Use it for **w4a16, w8a8 and w4a8**: the
  logits equal the in-memory fake-quantized model's bit for bit (tested in float32 for all three and
  in bf16 for w4a16 and w8a8).
* ``from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))``: dense
  weights at load time; activation quantization is **not** applied, so a W-A checkpoint then runs as
  W-only (its logits equal the in-memory model with the activation hooks removed). Use it for
  **w3a16** (``pack-quantized``): on the default route that export fails to load (``RuntimeError ...
  ignore_mismatched_sizes``), because the loader builds ``weight_zero_point`` as ``[out, groups]``
  while the checkpoint stores it packed (``[ceil(out*3/32), groups]``); the dequantize route unpacks it.
  Weight-only exports (w4a16, w3a16) give the same logits on both routes where both load.

Serving (vLLM, from its source; vLLM is not installed here, so this is not tested): fast GPU kernels
exist for **W4A16** (``CompressedTensorsWNA16``: Marlin / Machete, symmetric int4 g128) and **W8A8**
(``CompressedTensorsW8A8Int8``: int8 CUTLASS scaled-mm, dynamic per-token activations). **W3A16** has
none: ``CompressedTensorsWNA16`` takes zero points only for 4- and 8-bit weights (and most versions
take only 4/8-bit weights at all), so an int3 *asymmetric* checkpoint is refused. **W4A8** with int8
activations has CPU-only (Arm) kernels. Treat W3A16 and W4A8 as research checkpoints that transformers
evaluates (the routes above).

The caller's model is not modified: the compressed tensors are built in a separate state dict
passed to ``save_pretrained``. (``save_pretrained`` itself sets ``config.dtype`` and
``config.architectures``, which is harmless.) The model stays usable for evaluation after export.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tlq.config import ActQuantSpec, ConfigError, QuantScheme, WeightQuantSpec
from tlq.quant.quantizer import QuantizedWeight
from tlq.utils.finite import EXPORT_HINT, check_tensors_finite
from tlq.utils.outputs import check_output_dir, staged_output

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IGNORE",
    "ExportExistsError",
    "CT_FORMATS",
    "ct_format_for",
    "build_ct_scheme",
    "build_ct_config",
    "export_compressed_tensors",
    "read_stored_weights",
    "iter_stored_weights",
    "StoredWeight",
]

# Kept in 16 bits by default: vision tower (Qwen "visual", LLaVA "vision_tower"), projector, LM head.
DEFAULT_IGNORE: list[str] = [
    "re:.*visual.*",
    "re:.*vision_tower.*",
    "re:.*multi_modal_projector.*",
    "lm_head",
]

# Non-weight files of a checkpoint that a user needs to run the model (processor, tokenizer,
# chat template, generation defaults). Copied from ``source_dir`` when present.
PROCESSOR_FILES: tuple[str, ...] = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "image_processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
PROCESSOR_DIRS: tuple[str, ...] = ("additional_chat_templates",)


class ExportExistsError(ConfigError, FileExistsError):
    """The output directory exists and ``overwrite`` was not given."""


# --------------------------------------------------------------------------------------------------
# scheme -> compressed-tensors
# --------------------------------------------------------------------------------------------------
#: Formats the exporter can write (all store the codes as integers; none is lossy).
CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


def ct_format_for(scheme: QuantScheme) -> str:
    """The default compressed-tensors format of a scheme (see the module docstring)."""
    if scheme.weights.bits == 8 and scheme.quantizes_activations:
        return "int-quantized"  # W8A8: what vLLM's int8 scaled-mm scheme reads
    return "pack-quantized"  # W4A16, W3A16, W4A8 (and W8A16, compressed-tensors' own choice)


def build_ct_scheme(scheme: QuantScheme, targets: Iterable[str] = ("Linear",), ct_format: str | None = None):
    """A ``compressed_tensors.QuantizationScheme`` equal to ``scheme``, stored as ``ct_format``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    ct_format = ct_format or ct_format_for(scheme)
    if ct_format not in CT_FORMATS:
        raise ConfigError(
            f"unsupported compressed-tensors format {ct_format!r}; choose one of: {', '.join(CT_FORMATS)}"
        )

    w = scheme.weights
    weights = QuantizationArgs(
        num_bits=w.bits,
        type="int",
        symmetric=w.symmetric,
        strategy="group" if w.group_size is not None else "channel",
        group_size=w.group_size,
        dynamic=False,
    )
    inputs = None
    if scheme.activations is not None:
        inputs = QuantizationArgs(
            num_bits=scheme.activations.bits,
            type="int",
            symmetric=True,
            strategy="token",
            dynamic=True,
        )
    return QuantizationScheme(targets=list(targets), weights=weights, input_activations=inputs, format=ct_format)


def quant_scheme_from_ct(ct_scheme) -> QuantScheme:
    """The tlq scheme a ``compressed_tensors.QuantizationScheme`` stores (the inverse of
    :func:`build_ct_scheme` for what tlq writes: int weights, optional dynamic per-token activations)."""
    w, a = ct_scheme.weights, ct_scheme.input_activations
    weights = WeightQuantSpec(bits=w.num_bits, group_size=w.group_size if w.strategy == "group" else None, symmetric=w.symmetric)
    return QuantScheme("stored", weights, None if a is None else ActQuantSpec(bits=a.num_bits))


def build_ct_config(scheme: QuantScheme, ignore: Iterable[str], ct_format: str | None = None):
    """The ``QuantizationConfig`` written to ``config.json`` (status ``compressed``)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    ct_scheme = build_ct_scheme(scheme, ct_format=ct_format)
    return QuantizationConfig(
        config_groups={"group_0": ct_scheme},
        format=ct_scheme.format,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _check_ignore(ignore: list[str]) -> None:
    for item in ignore:
        if not item.startswith("re:") and "." in item:
            log.warning(
                "ignore entry %r is a concrete dotted module name: transformers renames checkpoint keys on "
                "load, so it may not match at reload time; prefer a regex such as 're:.*%s$'",
                item,
                item.split(".")[-1],
            )


def _targeted_modules(model: nn.Module, ignore: list[str]) -> dict[str, nn.Module]:
    from compressed_tensors.utils import match_named_modules

    return dict(match_named_modules(model, ["Linear"], ignore))


def _check_weights_match(name: str, weight: Tensor, qw: QuantizedWeight, rows_per_block: int = 256) -> None:
    """The in-memory weight must be the dequantized codes, or the export is not the evaluated model.

    Checked ``rows_per_block`` rows at a time: the float32 temporaries of a whole wide weight would be
    the largest allocation of a streamed export.
    """
    if weight.device.type == "meta":
        return
    eps = torch.finfo(weight.dtype).eps if weight.dtype.is_floating_point else 0.0
    rep = qw.codes.shape[1] // qw.scale.shape[1]
    worst = 0.0
    for r0 in range(0, qw.codes.shape[0], rows_per_block):
        rows = slice(r0, r0 + rows_per_block)
        block = QuantizedWeight(qw.codes[rows], qw.scale[rows], qw.zero_point[rows], qw.spec)
        deq = block.dequantize(torch.float32)
        diff = (weight.detach()[rows].to("cpu", torch.float32) - deq).abs()
        bound = 0.01 * block.scale.float().repeat_interleave(rep, dim=1) + 2 * eps * deq.abs() + 1e-12
        if bool((diff > bound).any()):
            worst = max(worst, float(diff.max()))
    if worst > 0:
        raise ConfigError(
            f"the weight of {name} is not the dequantized value of its codes "
            f"(max |W - dequant| = {worst:.3g}): write qw.dequantize() into the model, "
            "or pass check_weights=False if this is intended"
        )


def _compress_one(qw: QuantizedWeight, ct_scheme, scale_dtype: torch.dtype, name: str) -> dict[str, Tensor]:
    """Compressed tensors (local names) for one linear, with exactly our codes and scales."""
    from compressed_tensors.compressors import BaseCompressor

    codes = qw.codes.detach().cpu().to(torch.int8)
    scale_f32 = qw.scale.detach().cpu().float()
    scale = scale_f32.to(scale_dtype)
    if not torch.equal(scale.float(), scale_f32):
        log.warning(
            "%s: scales are not exactly representable in %s (compute them with scale_dtype=%s); the stored "
            "codes are TLQ's, but the reloaded weights differ from the in-memory ones by the scale rounding",
            name,
            scale_dtype,
            scale_dtype,
        )
    zp = qw.zero_point.detach().cpu().to(torch.int8)
    # A float weight that quantizes back to exactly our codes with the stored scale.
    in_f = codes.shape[1]
    rep = in_f // scale.shape[1]
    weight = (codes.float() - zp.float().repeat_interleave(rep, 1)) * scale.float().repeat_interleave(rep, 1)
    local: dict[str, Tensor] = {"weight": weight, "weight_scale": scale}
    if not qw.spec.symmetric:
        local["weight_zero_point"] = zp
    compressor = BaseCompressor.get_value_from_registry(ct_scheme.format)
    out = compressor.compress(local, ct_scheme)
    stored = _decode_local(out, ct_scheme, codes.shape)
    if not torch.equal(stored.codes, codes):
        raise RuntimeError(f"{name}: compressed-tensors changed the integer codes while compressing")
    if not qw.spec.symmetric and not torch.equal(stored.zero_point, zp):
        raise RuntimeError(f"{name}: compressed-tensors changed the zero points while compressing")
    return out


class StoredWeight:
    """Codes, scale and zero point of one stored linear, decoded from a checkpoint."""

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor | None) -> None:
        self.codes = codes
        self.scale = scale
        self.zero_point = zero_point


def _decode_local(sd: Mapping[str, Tensor], ct_scheme, shape: Iterable[int] | None = None) -> StoredWeight:
    """Unpack one module's compressed tensors (local names) into int8 codes [out, in]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = ct_scheme.weights
    scale = sd["weight_scale"]
    if "weight_packed" in sd:
        shape = tuple(int(s) for s in (sd["weight_shape"] if "weight_shape" in sd else shape))
        codes = unpack_from_int32(sd["weight_packed"], w.num_bits, torch.Size(shape))
        zp = sd.get("weight_zero_point")
        if zp is not None and zp.dtype == torch.int32:
            zp = unpack_from_int32(zp, w.num_bits, torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
    else:
        codes = sd["weight"]
        zp = sd.get("weight_zero_point")
    return StoredWeight(codes.to(torch.int8), scale, None if zp is None else zp.to(torch.int8))


def iter_stored_weights(ckpt_dir: str | Path) -> Iterator[tuple[str, StoredWeight]]:
    """Decode the quantized linears of a compressed-tensors checkpoint one at a time (low memory).

    Yields ``(module name as saved, StoredWeight)``; names are checkpoint names, e.g.
    ``model.layers.0.mlp.up_proj`` (Qwen) or ``language_model.layers.0.mlp.up_proj`` (LLaVA-OneVision).
    """
    from compressed_tensors.quantization import QuantizationConfig

    ckpt_dir = Path(ckpt_dir)
    with (ckpt_dir / "config.json").open() as f:
        qcfg = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    if len(qcfg.config_groups) != 1:
        raise ConfigError(f"{ckpt_dir}: expected one config group, found {list(qcfg.config_groups)}")
    yield from iter_stored_in_files(sorted(ckpt_dir.glob("*.safetensors")), next(iter(qcfg.config_groups.values())))


def iter_stored_in_files(files: Iterable[Path], ct_scheme) -> Iterator[tuple[str, StoredWeight]]:
    """Decode the quantized linears stored in ``files`` under ``ct_scheme`` (see ``iter_stored_weights``)."""
    from safetensors import safe_open

    handles = [safe_open(str(file), framework="pt") for file in files]
    # module -> {local name: handle index}; a module's tensors may sit in different shards
    where: dict[str, dict[str, int]] = {}
    for i, h in enumerate(handles):
        for key in h.keys():
            mod, _, local = key.rpartition(".")
            if local.startswith("weight"):
                where.setdefault(mod, {})[local] = i
    for mod, locals_ in where.items():
        if "weight_scale" not in locals_:
            continue
        sd = {local: handles[i].get_tensor(f"{mod}.{local}") for local, i in locals_.items()}
        yield mod, _decode_local(sd, ct_scheme)


def read_stored_weights(ckpt_dir: str | Path) -> dict[str, StoredWeight]:
    """``dict(iter_stored_weights(ckpt_dir))``: every quantized linear of the checkpoint, decoded."""
    return dict(iter_stored_weights(ckpt_dir))


def _checkpoint_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Map in-memory module names to the names ``save_pretrained`` writes (reverse key renames)."""
    from transformers.core_model_loading import revert_weight_conversion

    markers = {f"{n}.weight_scale": torch.empty(0) for n in names}
    by_id = {id(t): k for k, t in markers.items()}
    reverted = revert_weight_conversion(model, dict(markers))
    out: dict[str, str] = {}
    for new_key, t in reverted.items():
        old_key = by_id.get(id(t))
        if old_key is not None:
            out[old_key.removesuffix(".weight_scale")] = new_key.removesuffix(".weight_scale")
    missing = [n for n in names if n not in out]
    if missing:
        raise RuntimeError(f"cannot map {missing[:3]} to checkpoint names (unsupported weight conversion)")
    return out


def _set_config_dtype(cfg: dict[str, Any], dtype_name: str) -> None:
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = dtype_name
    for value in cfg.values():
        if isinstance(value, dict) and ("model_type" in value or "dtype" in value):
            _set_config_dtype(value, dtype_name)


def write_quantization_config(ckpt: Path, qcfg: Any, save_dtype: torch.dtype | None) -> None:
    """Add ``qcfg`` to ``ckpt/config.json`` (compressed-tensors' own writer) and, with ``save_dtype``,
    set every ``dtype`` in it to the dtype the dense tensors were stored in."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=qcfg).update_config(str(ckpt))
    if save_dtype is not None:
        cfg_path = ckpt / "config.json"
        cfg = json.loads(cfg_path.read_text())
        _set_config_dtype(cfg, str(save_dtype).removeprefix("torch."))
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _copy_processor_files(source_dir: Path, dest: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        src = source_dir / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    for name in PROCESSOR_DIRS:
        src = source_dir / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
            copied.append(name + "/")
    return copied


def export_compressed_tensors(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    ignore: Iterable[str] | None = None,
    save_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    processor: Any = None,
    ct_format: str | None = None,
    check_weights: bool = True,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``model`` with the codes in ``quantized`` as a compressed-tensors checkpoint.

    ``model``: the in-memory transformers model whose quantized linears hold the dequantized weights.
    ``quantized``: ``{module name (as in model.named_modules()): QuantizedWeight}``; it must cover
    exactly the ``Linear`` modules not matched by ``ignore`` (a targeted but unquantized linear would be
    read as quantized at reload).
    ``ignore``: modules kept dense, as regexes (``re:...``) or exact names; default ``DEFAULT_IGNORE``.
    ``save_dtype``: dtype of the dense tensors and scales on disk (default: the model's dtype). Codes
    are exact in any dtype; scales are exact when they were computed with ``scale_dtype=save_dtype``.
    ``source_dir`` / ``processor``: where the processor, tokenizer, chat template and generation config
    come from (files copied from ``source_dir``; ``processor.save_pretrained`` if given).
    ``ct_format``: override the storage format (``CT_FORMATS``; default ``ct_format_for(scheme)``), e.g.
    ``"naive-quantized"`` for a w3a16 checkpoint that transformers' default route loads.
    ``check_weights``: refuse to export when a module's weight is not the dequantized value of its codes.
    Writes into a temporary sibling directory and renames it into place at the end; an existing
    ``out_dir`` is replaced only with ``overwrite=True``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    ignore = list(DEFAULT_IGNORE if ignore is None else ignore)
    _check_ignore(ignore)
    protected = [("source checkpoint", Path(source_dir))] if source_dir is not None else []
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ExportExistsError(f"output directory {out_dir} already exists; pass --overwrite to replace it, or choose another output directory")
    check_output_dir(out_dir, overwrite, "output directory", protected)
    if not quantized:
        raise ConfigError("nothing to export: no quantized modules")

    # --- what is quantized must be exactly what the config will target at reload ---------------
    targeted = _targeted_modules(model, ignore)
    unknown = [n for n in quantized if n not in targeted]
    if unknown:
        kind = "ignored or not a Linear" if all(n in dict(model.named_modules()) for n in unknown) else "unknown"
        raise ConfigError(f"quantized modules {unknown[:5]} are {kind}: they cannot be exported under {ignore}")
    unquantized = [n for n in targeted if n not in quantized]
    if unquantized:
        raise ConfigError(
            f"{len(unquantized)} Linear modules are targeted by the export but were not quantized "
            f"(e.g. {unquantized[:5]}): quantize them, or add regexes matching them to the ignore list"
        )
    for name, qw in quantized.items():
        mod = targeted[name]
        if tuple(qw.codes.shape) != tuple(mod.weight.shape):
            raise ConfigError(f"{name}: codes {tuple(qw.codes.shape)} do not match weight {tuple(mod.weight.shape)}")
        if qw.spec.bits != scheme.weights.bits or qw.spec.symmetric != scheme.weights.symmetric:
            raise ConfigError(f"{name}: quantized with {qw.spec}, not with scheme {scheme.name}")
        n_groups = 1 if scheme.weights.group_size is None else mod.weight.shape[1] // scheme.weights.group_size
        if qw.scale.shape[1] != n_groups:
            raise ConfigError(f"{name}: {qw.scale.shape[1]} scale groups, scheme {scheme.name} expects {n_groups}")
        if check_weights:
            _check_weights_match(name, mod.weight, qw)

    model_dtype = next(iter(targeted.values())).weight.dtype
    dtype = save_dtype or model_dtype
    ct_scheme = build_ct_scheme(scheme, ct_format=ct_format)
    qcfg = build_ct_config(scheme, ignore, ct_format=ct_format)

    # --- the state dict to save: the model's own tensors, quantized linears replaced -----------
    state_dict: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        if save_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(save_dtype)
        state_dict[key] = tensor
    for name, qw in quantized.items():
        local = _compress_one(qw, ct_scheme, dtype, name)
        state_dict.pop(f"{name}.weight")
        for local_name, t in local.items():
            state_dict[f"{name}.{local_name}"] = t

    check_tensors_finite(state_dict.items(), "the checkpoint to export,", EXPORT_HINT)
    with staged_output(out_dir, "quantized checkpoint") as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict, max_shard_size=max_shard_size)
        del state_dict
        write_quantization_config(tmp, qcfg, save_dtype)
        copied = _copy_processor_files(source_dir, tmp) if source_dir is not None else []
        if processor is not None:
            processor.save_pretrained(str(tmp))
        if source_dir is None and processor is None:
            log.warning("no source_dir or processor given: %s will have no processor/tokenizer files", out_dir)
        elif source_dir is not None and processor is None and not any(
            c in copied for c in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            log.warning("no tokenizer files found in %s; the exported checkpoint has no processor", source_dir)

        # --- read the saved files back: the stored codes and scales must be ours ----------------
        _verify_saved(tmp, model, quantized, dtype)
    log.info("wrote %s (%s, %d quantized linears)", out_dir, qcfg.format, len(quantized))
    return out_dir


def _verify_saved(
    ckpt: Path, model: nn.Module, quantized: Mapping[str, QuantizedWeight], scale_dtype: torch.dtype
) -> None:
    """Read the written files back: every quantized module's codes, scales and zero points must be ours."""
    verify_stored(iter_stored_weights(ckpt), _checkpoint_names(model, list(quantized)), quantized, scale_dtype)


def verify_stored(stored: Iterable[tuple[str, StoredWeight]], names: Mapping[str, str], quantized: Mapping[str, QuantizedWeight], scale_dtype: torch.dtype) -> None:
    """Every module of ``quantized`` must be in ``stored`` (by checkpoint name, ``names[module]``) with
    exactly our codes, scales and zero points, and nothing else may be stored quantized."""
    by_ckpt_name = {ckpt_name: name for name, ckpt_name in names.items()}
    seen = set()
    for ckpt_name, saved in stored:
        name = by_ckpt_name.get(ckpt_name)
        if name is None:
            raise RuntimeError(f"the saved checkpoint has an unexpected quantized module {ckpt_name}")
        qw = quantized[name]
        if not torch.equal(saved.codes, qw.codes.detach().cpu().to(torch.int8)):
            raise RuntimeError(f"{name}: the saved codes differ from the quantized codes")
        if not torch.equal(saved.scale, qw.scale.detach().cpu().to(scale_dtype)):
            raise RuntimeError(f"{name}: the saved scales differ from the quantized scales")
        if not qw.spec.symmetric and not torch.equal(saved.zero_point, qw.zero_point.detach().cpu().to(torch.int8)):
            raise RuntimeError(f"{name}: the saved zero points differ from the quantized zero points")
        seen.add(name)
    missing = [n for n in quantized if n not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} quantized modules are missing from the saved checkpoint: {missing[:3]}")
