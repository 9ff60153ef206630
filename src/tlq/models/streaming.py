"""Streaming: a model whose decoder layers live on disk until the engine asks for one.

For a model larger than memory, only the parts that run once (vision tower, projector, embeddings,
final norm, LM head) are loaded. The decoder is a *skeleton* on the ``meta`` device: its modules, shapes
and hooks exist, its tensors do not. :class:`StreamedLayers` materializes one decoder layer at a time
from the checkpoint's safetensors files and sends it back to ``meta`` when the engine is done with it,
so peak memory is the resident parts plus one or two layers, whatever the depth.

Checkpoint keys are mapped to module names with transformers' own conversion machinery
(``get_model_conversion_mapping`` + ``rename_source_key``, the same renames ``from_pretrained``
applies, e.g. a Qwen2-VL hub checkpoint's ``model.layers.N`` -> ``model.language_model.layers.N``).
Checkpoints that need a tensor *conversion* (fused / split weights) rather than a rename are refused.

Safetensors files are opened per load and closed right after: a memory map that stayed open would keep
every page it ever touched resident, and the whole checkpoint would end up counted in the process's
memory.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn

from tlq.config import ConfigError
from tlq.models.base import ModelAdapter
from tlq.models.moe import FusedSlice, fused_slices
from tlq.utils.finite import check_weights

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 64 * 1024


def return_freed_memory_to_os() -> bool:
    """Make glibc serve every allocation above 64 KiB with its own memory map, returned on free.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large mapped block is freed;
    after the first layer, layer-sized buffers then come from the heap, which fragments and is never
    given back, and a streamed run's memory creeps up layer after layer (measured: +170 MiB over three
    2048-wide layers). Fixing the threshold keeps every layer's memory returnable. Returns whether
    it applied (only on Linux with glibc; elsewhere nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
    """``{safetensors file name: [tensor keys]}`` of a local checkpoint (single file or sharded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / _INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, list[str]] = defaultdict(list)
        for key, file in weight_map.items():
            files[file].append(key)
        return dict(files)
    single = model_dir / _SINGLE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {_SINGLE: list(f.keys())}
    raise ConfigError(
        f"{model_dir} has no {_SINGLE} or {_INDEX}: streaming reads safetensors checkpoints only "
        "(convert .bin weights with save_pretrained, or run without --stream)"
    )


class KeyRenamer:
    """The renames ``from_pretrained`` applies to one model's checkpoint keys (e.g. a hub Qwen2-VL's
    ``model.layers.N`` -> ``model.language_model.layers.N``), from transformers' own conversion mapping.

    Shared by streamed loading (keys -> module names) and the reload of foreign exports (ignore-list
    entries written as checkpoint keys), so both follow exactly what ``from_pretrained`` does.
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._prefix = model.base_model_prefix
        self._expected = model.state_dict()

    def __call__(self, key: str) -> tuple[str, Any]:
        """``(in-memory name, converter)`` of checkpoint ``key``; the converter (a transformers
        ``WeightConverter``) is None for a plain rename."""
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(key, self.renamings, self.converters, self._prefix, self._expected)
        if pattern is None:
            return name, None
        return name, next((c for c in self.converters if pattern in c.source_patterns), pattern)

    def without_converters(self, key: str) -> str:
        """``key``'s in-memory name with the renames only (a per-expert checkpoint key that
        ``from_pretrained`` would merge into a fused tensor keeps its per-expert name)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self.renamings, [], self._prefix, self._expected)[0]

    def used(self) -> list[Any]:
        """The renames that matched a key so far (what an export must reverse)."""
        return [t for t in self.renamings if t.was_used()]


class CheckpointIndex:
    """Where every tensor of the model lives on disk, keyed by its in-memory name.

    Built from the safetensors headers only (no tensor is read). ``conversions`` are the transforms that
    matched a key; they are attached to the model as ``_weight_conversions`` so that an export reverses
    exactly the renames that were applied, as after ``from_pretrained``.
    """

    def __init__(self, model_dir: Path, model: nn.Module) -> None:
        self.model_dir = Path(model_dir)
        rename = KeyRenamer(model)
        self.location: dict[str, tuple[str, str]] = {}  # name -> (file, checkpoint key)
        self.transposes: dict[str, Any] = {}  # name -> the Transpose op from_pretrained applies to it
        self.slices: dict[str, FusedSlice] = {}  # per-expert name -> its place in a fused tensor (add_slices)
        for file, keys in checkpoint_files(self.model_dir).items():
            for key in keys:
                name, converter = rename(key)
                if converter is not None and _merges_modules(converter):
                    name = rename.without_converters(key)  # served per expert, as an unfused model names it
                elif converter is not None:
                    self.transposes[name] = _only_transpose(key, converter)
                self.location[name] = (file, key)
        self.conversions = rename.used()

    def add_slices(self, slices: dict[str, FusedSlice]) -> None:
        """Serve per-expert names (of an unfused MoE block) from the fused tensors they were made from,
        where the checkpoint does not hold them per expert already."""
        slices = {n: sl for n, sl in slices.items() if n not in self.location}
        absent = sorted({sl.fused for sl in slices.values()} - set(self.location))
        if absent:
            raise ConfigError(f"the checkpoint lacks {absent[:3]}: it does not match its config.json")
        self.slices.update(slices)

    def has(self, name: str) -> bool:
        return name in self.location or name in self.slices

    def load(self, names: Iterable[str], device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read ``names`` (in-memory names) from disk, floating tensors cast to ``dtype``. A per-expert
        name is cut from its fused tensor, which is read once per call for all its experts."""
        from safetensors import safe_open

        names = list(names)
        sliced = [n for n in names if n in self.slices]
        shapes = {self.slices[n].fused: self.slices[n].shape for n in sliced}
        plain = [n for n in names if n not in self.slices] + [f for f in shapes if f not in names]
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in plain:
            by_file[self.location[name][0]].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.model_dir / file), framework="pt", device="cpu") as f:
                for name in file_names:
                    t = f.get_tensor(self.location[name][1])
                    if name in self.transposes:
                        t = _apply_transpose(self.transposes[name], t, shapes.get(name))
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        fused = {f: out[f] if f in names else out.pop(f) for f in shapes}
        out.update({n: self.slices[n].take(fused[self.slices[n].fused]) for n in sliced})
        check_weights(out.items(), str(self.model_dir), dtype)
        return out


def _merges_modules(converter: Any) -> bool:
    """Whether ``converter`` merges per-module checkpoint tensors (per-expert ``gate_proj`` ...) into one."""
    from transformers.core_model_loading import MergeModulelist

    return any(isinstance(op, MergeModulelist) for op in getattr(converter, "operations", []) or [])


def _only_transpose(key: str, converter: Any) -> Any:
    """The single ``Transpose`` a converter applies to ``key`` (what transformers does to the hub's fused
    MoE experts); any other conversion (merging per-expert tensors, splitting) is refused."""
    from transformers.core_model_loading import Transpose

    ops = list(getattr(converter, "operations", []) or [])
    if len(ops) == 1 and isinstance(ops[0], Transpose) and len(converter.source_patterns) == 1:
        return ops[0]
    raise ConfigError(f"checkpoint tensor {key!r} needs a weight conversion ({converter}), which streaming does not apply; run without --stream")


def _apply_transpose(op: Any, t: torch.Tensor, runtime_shape: tuple[int, ...] | None) -> torch.Tensor:
    """``op`` on one tensor, as from_pretrained applies it: with ``check_dims``, a tensor that already has
    the runtime shape is kept as it is."""
    if op.check_dims and runtime_shape is not None and tuple(t.shape) == tuple(runtime_shape):
        return t
    return t.transpose(op.dim0, op.dim1).contiguous()


def _owners(model: nn.Module) -> dict[int, Any]:
    """For every module, the nearest enclosing ``PreTrainedModel`` (whose ``_init_weights`` knows it)."""
    from transformers import PreTrainedModel

    owner: dict[int, Any] = {}

    def walk(mod: nn.Module, current: Any) -> None:
        if isinstance(mod, PreTrainedModel):
            current = mod
        owner[id(mod)] = current
        for child in mod.children():
            walk(child, current)

    walk(model, model)
    return owner


class StreamedModel:
    """A transformers VLM with its resident parts loaded and its decoder layers on ``meta``.

    ``model`` behaves like the loaded model up to decoder layer 0 (which is all
    ``ModelAdapter.capture_layer0_inputs`` runs) and for the final norm and LM head.
    """

    def __init__(self, adapter: ModelAdapter, model_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        import transformers

        return_freed_memory_to_os()
        self.adapter, self.device, self.dtype = adapter, torch.device(device), dtype
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        cls = getattr(transformers, adapter.spec.model_class)
        with torch.device("meta"):
            self.model = cls._from_config(config, dtype=dtype)
        self.model.eval()
        self.index = CheckpointIndex(model_dir, self.model)
        self.model._weight_conversions = self.index.conversions  # what an export must reverse
        self.layers = adapter.decoder_layers(self.model)
        if adapter.unfuse(self.model):  # MoE: the engine's per-expert linears, cut from the fused tensors
            self.index.add_slices(fused_slices(self.layers, adapter.spec.decoder_layers))
        self._owners = _owners(self.model)
        self._in_layers = {id(m) for m in self.layers.modules()}
        self._load_resident()

    # --- resident parts ------------------------------------------------------------------------
    def _load_resident(self) -> None:
        """Materialize everything but the decoder layers: weights from disk, computed buffers by init."""
        resident = [(n, m) for n, m in self.model.named_modules() if id(m) not in self._in_layers]
        tied = self._tied_targets()
        names = _local_tensor_names(resident)
        missing = [n for n in names if n not in self.index.location and n not in tied]
        if missing:
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} weights of the model (e.g. {missing[:3]}): "
                "it does not match its config.json"
            )
        self._init_computed_buffers(m for _n, m in resident)
        self._assign(self.index.load([n for n in names if n in self.index.location], self.device, self.dtype))
        if tied:
            self.model.tie_weights()

    def _tied_targets(self) -> set[str]:
        """Parameters that are the tied copy of another (the LM head of a model with tied embeddings)."""
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if not getattr(text, "tie_word_embeddings", False) and not getattr(cfg, "tie_word_embeddings", False):
            return set()
        return set(getattr(self.model, "all_tied_weights_keys", None) or {})

    def _init_computed_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Non-persistent buffers (rotary frequencies, position ids) are not in checkpoints: transformers
        computes them in ``_init_weights`` of the owning model, which is called here on the modules that
        have such buffers, *before* their weights are read (so whatever else it initializes is then
        overwritten by the checkpoint). Other modules get their tensors straight from disk, with no
        throw-away allocation."""
        for mod in modules:
            if getattr(mod, "_non_persistent_buffers_set", None):
                mod.to_empty(device=self.device, recurse=False)
                self._owners[id(mod)]._init_weights(mod)

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put loaded tensors in place of the (meta or placeholder) ones, by full name."""
        for name, value in tensors.items():
            owner, _, leaf = name.rpartition(".")
            mod = self.model.get_submodule(owner)
            if leaf in mod._parameters:
                mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                mod._buffers[leaf] = value

    # --- decoder layers ------------------------------------------------------------------------
    def layer_names(self, index: int) -> list[str]:
        """Full names of decoder layer ``index``'s parameters and persistent buffers."""
        prefix = self.adapter.decoder_layer_prefix(index)
        return _local_tensor_names([(f"{prefix}.{n}" if n else prefix, m) for n, m in self.layers[index].named_modules()])

    def load_layer(self, index: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Materialize decoder layer ``index``, from the checkpoint or from ``state`` (its local state dict,
        as saved by a resumable run)."""
        layer = self.layers[index]
        names = self.layer_names(index)
        self._init_computed_buffers(layer.modules())
        if state is not None:
            prefix = self.adapter.decoder_layer_prefix(index) + "."
            self._assign({prefix + k: v.to(self.device) for k, v in state.items()})
            return layer
        absent = [n for n in names if not self.index.has(n)]
        if absent:
            raise ConfigError(f"the checkpoint lacks {absent[:3]}: it does not match its config.json")
        self._assign(self.index.load(names, self.device, self.dtype))
        return layer

    def release_layer(self, index: int) -> None:
        """Send layer ``index`` back to ``meta``: its memory is freed, its modules and hooks stay."""
        self.layers[index].to("meta")

    def resident_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores outside the decoder layers (tied copies left out, as
        ``save_pretrained`` does)."""
        layers, tied = self.adapter.spec.decoder_layers + ".", self._tied_targets()
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(layers) and k not in tied}


def _local_tensor_names(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Full names of the parameters and persistent buffers owned directly by the resident modules."""
    names = []
    for n, m in modules:
        prefix = f"{n}." if n else ""
        names += [prefix + p for p, _ in m.named_parameters(recurse=False)]
        names += [prefix + b for b, _ in m.named_buffers(recurse=False) if b not in m._non_persistent_buffers_set]
    return names


class LayerSource(Protocol):
    """Where the layer-wise engine and the importance pass get decoder layers from, one at a time."""

    def __len__(self) -> int: ...

    def load(self, index: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Layer ``index``, ready to run (with ``state``: holding those tensors, e.g. from a resume state)."""
        ...

    def release(self, index: int) -> None:
        """The caller is done with layer ``index`` for now."""
        ...


class ResidentLayers:
    """The decoder layers of a fully loaded model: loading and releasing are no-ops.

    The layer-wise engine and the importance pass ask a layer source for layer ``i`` and hand it back
    when done; this is the source for a model that fits in memory, :class:`StreamedLayers` the one
    for a model that does not.
    """

    def __init__(self, adapter: ModelAdapter, model: nn.Module) -> None:
        self.layers = adapter.decoder_layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        if state is not None:
            self.layers[index].load_state_dict(state)
        return self.layers[index]

    def release(self, index: int) -> None:
        pass


class StreamedLayers:
    """The decoder layers of a :class:`StreamedModel`: each is read from disk on ``load`` and freed on
    ``release``."""

    def __init__(self, streamed: StreamedModel) -> None:
        self.streamed = streamed

    def __len__(self) -> int:
        return len(self.streamed.layers)

    def load(self, index: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        return self.streamed.load_layer(index, state)

    def release(self, index: int) -> None:
        self.streamed.release_layer(index)
