"""Write a compressed-tensors checkpoint one decoder layer at a time (the streaming path's export).

The in-memory exporter (:func:`tlq.export.compressed_tensors.export_compressed_tensors`) builds one
state dict of the whole model; a streamed run never has the whole model. Here each finished decoder
layer becomes its own safetensors shard as soon as it is calibrated (``model-0000K-of-0000N``), the
resident parts (embeddings, vision tower, norm, LM head) the last shard, and
``model.safetensors.index.json`` ties them together: the layout transformers and vLLM read for any
sharded checkpoint. Tensors, names (transformers' reverse key renames), formats and the
``quantization_config`` are those of the in-memory exporter, and the tests check that both give the
same tensors.

Every shard is read back right after writing: its codes, scales and zero points must be exactly the
ones TLQ computed. Everything is written into a temporary sibling directory, renamed into place by
:meth:`StreamedExport.finish`; :meth:`StreamedExport.abort` removes it after an error, and the next
run removes the one a killed run left.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from tlq.config import ConfigError, QuantScheme
from tlq.export.compressed_tensors import (
    DEFAULT_IGNORE,
    ExportExistsError,
    _check_weights_match,
    _compress_one,
    _copy_processor_files,
    _targeted_modules,
    build_ct_config,
    build_ct_scheme,
    iter_stored_in_files,
    verify_stored,
    write_quantization_config,
)
from tlq.quant.quantizer import QuantizedWeight
from tlq.utils.finite import EXPORT_HINT, check_tensors_finite
from tlq.utils.outputs import check_output_dir, publish, staging_dir, sweep_leftovers

INDEX_FILE = "model.safetensors.index.json"


class StreamedExport:
    """A compressed-tensors checkpoint under construction, one shard per decoder layer.

    ``model`` is the (streamed) model the layers belong to: it gives module names, the key renames
    and the config. ``layer_prefix(i)`` is decoder layer ``i``'s module name.
    """

    def __init__(self, model: nn.Module, scheme: QuantScheme, out_dir: str | Path, *, num_layers: int, layer_prefix: Callable[[int], str], source_dir: str | Path | None = None, ignore: Iterable[str] | None = None, save_dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, ct_format: str | None = None) -> None:
        self.model, self.scheme, self.out_dir = model, scheme, Path(out_dir)
        if (self.out_dir.exists() or self.out_dir.is_symlink()) and not overwrite:
            raise ExportExistsError(f"output directory {self.out_dir} already exists; pass --overwrite to replace it")
        protected = [("source checkpoint", Path(source_dir))] if source_dir is not None else []
        check_output_dir(self.out_dir, overwrite, "output directory", protected)
        self.num_layers, self.layer_prefix = num_layers, layer_prefix
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.ignore = list(DEFAULT_IGNORE if ignore is None else ignore)
        self.save_dtype, self.ct_format = save_dtype, ct_format
        self.ct_scheme = build_ct_scheme(scheme, ct_format=ct_format)
        self.targeted = set(_targeted_modules(model, self.ignore))
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        # Named after its owner: a partial export of a killed run (SIGKILL, OOM) is swept by the next one.
        sweep_leftovers(self.out_dir)
        self.tmp = staging_dir(self.out_dir)

    def _shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.num_layers + 1:05d}.safetensors"

    # --- per layer ---------------------------------------------------------------------------------
    def write_layer(self, index: int, layer: nn.Module, quantized: Mapping[str, QuantizedWeight]) -> None:
        """Write decoder layer ``index`` (loaded, holding the dequantized weights) with its codes."""
        prefix = self.layer_prefix(index)
        expected = {n for n in self.targeted if n.startswith(prefix + ".")}
        if set(quantized) != expected:
            raise ConfigError(f"layer {index}: quantized {sorted(set(quantized) ^ expected)[:4]} do not match the export targets")
        replaced = {f"{name}.weight" for name in quantized}  # never cast: their codes are stored instead
        state: dict[str, Tensor] = {}
        for key, t in layer.state_dict().items():
            if f"{prefix}.{key}" not in replaced:
                state[f"{prefix}.{key}"] = _cast(t, self.save_dtype)
        for name, qw in quantized.items():
            weight = layer.get_submodule(name[len(prefix) + 1 :]).weight
            if tuple(qw.codes.shape) != tuple(weight.shape):
                raise ConfigError(f"{name}: codes {tuple(qw.codes.shape)} do not match weight {tuple(weight.shape)}")
            _check_weights_match(name, weight, qw)
            state.update({f"{name}.{local}": t for local, t in _compress_one(qw, self.ct_scheme, self.save_dtype, name).items()})
        check_tensors_finite(state.items(), f"decoder layer {index} to export,", EXPORT_HINT)
        names = self._save(index, state)
        path = self.tmp / self._shard_name(index)
        verify_stored(iter_stored_in_files([path], self.ct_scheme), {n: names[f"{n}.weight_scale"].removesuffix(".weight_scale") for n in quantized}, quantized, self.save_dtype)

    def _save(self, k: int, state: dict[str, Tensor]) -> dict[str, str]:
        """Save ``state`` (in-memory names) as shard ``k`` under checkpoint names; returns the name map."""
        from safetensors.torch import save_file
        from transformers.core_model_loading import revert_weight_conversion

        by_id = {id(t): name for name, t in state.items()}
        saved = revert_weight_conversion(self.model, dict(state))
        names = {by_id[id(t)]: key for key, t in saved.items()}
        file = self._shard_name(k)
        save_file({key: t.contiguous() for key, t in saved.items()}, str(self.tmp / file), metadata={"format": "pt"})
        for key, t in saved.items():
            self.weight_map[key] = file
            self.total_size += t.numel() * t.element_size()
        return names

    # --- the end -----------------------------------------------------------------------------------
    def finish(self, resident_state: Mapping[str, Tensor]) -> Path:
        """Write the resident tensors, the index, the config and the processor files; move into place."""
        resident = {k: _cast(t, self.save_dtype) for k, t in resident_state.items()}
        check_tensors_finite(resident.items(), "the checkpoint to export,", EXPORT_HINT)
        self._save(self.num_layers, resident)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = self.model.config
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(str(self.tmp))
        write_quantization_config(self.tmp, build_ct_config(self.scheme, self.ignore, ct_format=self.ct_format), self.save_dtype)
        if self.source_dir is not None:
            _copy_processor_files(self.source_dir, self.tmp)
        publish(self.tmp, self.out_dir, "quantized checkpoint")
        return self.out_dir

    def abort(self) -> None:
        """Remove the partial checkpoint (after an error; the output directory is left untouched)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()
