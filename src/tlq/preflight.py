"""Checks that need no model, run before any model loads: a mistake costs seconds, not a calibration.

What a command reads (the model directory's files, every calibration line and image) and what it
writes (output directory, report, the disk they go to) are validated here, each failure one line that
names the problem and the fix. Checks that need the loaded model (weights finite, groups tile every
linear) run right after loading, in :mod:`tlq.api`.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlq.builtin import default_dataset, resolve_model_dir
from tlq.config import ConfigError, QuantScheme
from tlq.data.records import CalibRecord, choose, read_jsonl, reference_answer, verify_images
from tlq.utils.io import notice
from tlq.utils.outputs import check_free_space, check_output_dir, check_output_file

if TYPE_CHECKING:
    from tlq.models.base import ModelAdapter

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")
# safetensors dtype names -> bytes per element
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Headroom on the output estimate: scales, zero points, config and processor files, filesystem blocks.
_SIZE_MARGIN = 1.10


def read_config(model_dir: Path) -> dict:
    """``config.json`` as a dict, or a one-line error saying what is wrong with it."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no config.json: pass a local Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore the checkpoint's config.json") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} is not a JSON object; restore the checkpoint's config.json")
    return cfg


def check_model_files(model: str | Path) -> tuple[Path, str]:
    """A readable checkpoint directory with a ``model_type`` and weight files; returns it and the type."""
    model_dir = resolve_model_dir(model)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {str(model_dir)!r} does not exist; pass a local Hugging Face checkpoint")
    cfg = read_config(model_dir)
    model_type = cfg.get("model_type")
    if not model_type:
        raise ConfigError(f"{model_dir / 'config.json'} has no 'model_type'; is this a transformers checkpoint?")
    if not any(next(model_dir.glob(pattern), None) for pattern in _WEIGHT_FILES):
        raise ConfigError(f"{model_dir} has a config.json but no weight files (*.safetensors); copy the whole checkpoint")
    return model_dir, str(model_type)


def adapter_for(model_type: str) -> ModelAdapter:
    """The family's adapter (importing the adapters imports torch: asked for after the cheap checks)."""
    from tlq.models import adapter_for_model_type

    return adapter_for_model_type(model_type)


def check_model_dir(model: str | Path) -> tuple[Path, ModelAdapter]:
    """A readable checkpoint of a supported family, with weight files; returns its directory and adapter."""
    model_dir, model_type = check_model_files(model)
    return model_dir, adapter_for(model_type)


def check_calibration(path: Path, num_samples: int) -> list[CalibRecord]:
    """Every line parsed and every image decoded (``file:line: reason``); warns when fewer samples than
    asked exist, since results from 1 sample where 128 were meant are rarely what anyone wants."""
    records = read_jsonl(path)
    verify_images(records, str(path))
    if len(records) < num_samples:
        notice(f"{path} has {len(records)} samples, fewer than --num-samples {num_samples}; calibrating on all {len(records)}")
    return records


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else name == p or name.startswith(p + ".") for p in patterns)


def estimate_output_bytes(model_dir: Path, scheme: QuantScheme, ignore: tuple[str, ...], save_bytes: int = 2) -> int:
    """Bytes a quantized export of ``model_dir`` takes, from the safetensors headers alone.

    2-D ``.weight`` tensors of decoder layers (``.layers.`` in the name) not in ``ignore`` are stored at
    ``bits`` per element; everything else at ``save_bytes`` (16-bit). Other weight formats fall back to
    the files' size, an upper bound.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return int(sum(f.stat().st_size for pattern in _WEIGHT_FILES for f in model_dir.glob(pattern)) * _SIZE_MARGIN)
    total = 0.0
    for f in files:
        for name, info in _safetensors_header(f).items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            module = name.removesuffix(".weight")
            quantized = name.endswith(".weight") and len(info["shape"]) == 2 and ".layers." in name and not _matches(module, ignore)
            total += numel * (scheme.weights.bits / 8 if quantized else min(save_bytes, _DTYPE_BYTES.get(info["dtype"], 4)))
    return int(total * _SIZE_MARGIN)


@dataclass
class QuantizeInputs:
    """What :func:`check_quantize` established: resolved paths, the family's adapter, what ``--out`` holds."""

    model_dir: Path
    adapter: ModelAdapter
    calib: Path
    out: Path
    report: Path | None
    replaces: bool  # --out holds an earlier tlq output that this run will replace


def check_quantize(model: str | Path, calib: str | Path | None, out: str | Path, report: str | Path | None, *, overwrite: bool, scheme: QuantScheme, num_samples: int) -> QuantizeInputs:
    """All of ``tlq quantize``'s checks that need no model, in the order a user would fix them."""
    calib_path = default_dataset(model, "calib", calib)
    inputs = [("model directory", resolve_model_dir(model)), ("calibration file", calib_path)]
    report_path = check_output_file(report, overwrite, "--report", inputs) if report is not None else None
    out_dir = check_output_dir(out, overwrite, "--out", inputs + ([("report", report_path)] if report_path is not None else []))
    model_dir, model_type = check_model_files(model)
    check_calibration(calib_path, num_samples)
    adapter = adapter_for(model_type)
    check_free_space(out_dir, estimate_output_bytes(model_dir, scheme, adapter.spec.ignore))
    return QuantizeInputs(model_dir, adapter, calib_path, out_dir, report_path, replaces=out_dir.is_dir() and any(out_dir.iterdir()))


# Config entries that fix a checkpoint's tensor shapes: a quantized checkpoint must agree on all of them.
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "depth", "embed_dim", "patch_size")


def _shape_signature(cfg: dict) -> dict[str, object]:
    sig: dict[str, object] = {"model_type": cfg.get("model_type"), "architectures": cfg.get("architectures")}
    for section in ("", "text_config", "vision_config"):
        sub = cfg.get(section, {}) if section else cfg
        if isinstance(sub, dict):
            sig.update({f"{section + '.' if section else ''}{k}": sub[k] for k in _SHAPE_KEYS if k in sub})
    return sig


def check_comparable(quantized: Path, model_dir: Path, reference: dict, allow_unquantized: bool) -> None:
    """``quantized`` must be a quantized checkpoint of the reference's architecture and shapes: anything
    else gives numbers (a KL of 0.0, or of two unrelated models) that mean nothing."""
    flag = f"--quantized {str(quantized)!r}"
    if not (quantized / "config.json").is_file():
        raise ConfigError(f"{flag} is not a checkpoint directory (no config.json)")
    cfg = read_config(quantized)
    if quantized.resolve() == model_dir.resolve() and not allow_unquantized:
        raise ConfigError(f"{flag} is the FP reference (--model) itself; pass a tlq quantize output")
    if "quantization_config" not in cfg and not allow_unquantized:
        raise ConfigError(f"{flag} is not quantized (its config.json has no quantization_config); pass a tlq quantize output, or --allow-unquantized to compare anyway")
    ref, got = _shape_signature(reference), _shape_signature(cfg)
    diff = [f"{k} {got.get(k)} vs {ref.get(k)}" for k in sorted(set(ref) | set(got)) if ref.get(k) != got.get(k)]
    if diff:
        raise ConfigError(f"{flag} is not a quantization of --model ({'; '.join(diff[:3])}); pass the model it was quantized from")


def check_evaluate(model: str | Path, quantized: list[str | Path], data: str | Path | None, report: str | Path | None, *, overwrite: bool, num_samples: int | None, allow_unquantized: bool) -> tuple[list[CalibRecord], Path]:
    """All of ``tlq eval``'s checks that need no model; returns the records to score and their file."""
    if not quantized:
        raise ConfigError("nothing to compare: pass at least one --quantized OUT directory")
    model_dir, model_type = check_model_files(model)
    reference = read_config(model_dir)
    for q in quantized:
        check_comparable(Path(q), model_dir, reference, allow_unquantized)
    data_path = default_dataset(model, "test", data)
    if report is not None:
        check_output_file(report, overwrite, "--report", [("model directory", model_dir), ("evaluation data", data_path)] + [("quantized checkpoint", Path(q)) for q in quantized])
    records = read_jsonl(data_path)
    if num_samples is not None:
        records = choose(records, num_samples, seed=0)
        if len(records) < num_samples:
            notice(f"{data_path} has {len(records)} samples, fewer than --num-samples {num_samples}; scoring all {len(records)}")
    verify_images(records, str(data_path))
    adapter_for(model_type)  # a supported family
    empty = sum(1 for r in records if any(m["role"] == "assistant" for m in r.messages) and not reference_answer(r).strip())
    if empty:
        notice(f"{data_path}: {empty} of {len(records)} reference answers are empty; accuracy on them only says whether a model answers nothing")
    return records, data_path
