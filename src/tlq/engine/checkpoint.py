"""Per-layer resume state: a killed calibration restarts from the last finished decoder layer.

Layout of a resume directory (all writes atomic: temporary file, fsync, rename, fsync of the directory)::

    state.json                      format, run fingerprint and the parts it was computed from, world size
    progress.json                   {"completed_layers": k, ...}  -- the marker, written LAST for each layer
    layers/L00003.state.safetensors the decoder layer's state_dict after calibration (folded scales, fake-quant weights)
    layers/L00003.quant.safetensors codes / scale / zero_point of its quantized linears
    layers/L00003.json              report, quantized names and specs, sha256 of the two files above
    streams/L00003.r000.c000.safetensors  rank 0's activations after layer 3, in chunks of <= chunk_bytes
    streams/L00003.r000.json        their index (stream names, order, aliases), written after the chunks

Crash safety: a layer counts as finished only once ``progress.json`` says so, and that file is renamed
into place after every file of the layer (and every rank's streams) is durable. A crash anywhere before
leaves the previous layer as the last finished one, with its streams still on disk (older streams are
deleted only after the new marker). Stale partial files are removed when the directory is reopened.

Only the newest layer's streams are kept, so the disk holds at most two layers' activations (during a
save) plus every layer's (small) weights.

Distributed runs: :meth:`ResumeState.open`, :meth:`~ResumeState.save_layer` and
:meth:`~ResumeState.cleanup` are collective (call them on every rank); rank 0 writes the layer files and
the marker, each rank writes its own shard of the streams. The directory must be on a filesystem every
rank sees (one node, or a shared filesystem). A run resumes only with the same world size (its streams
are sharded by rank).

Fingerprint: :func:`run_fingerprint` hashes whatever the caller puts in ``parts``; the intended parts are
the resolved configuration (``QuantizeConfig.to_dict()``), :func:`model_identity` of the model
directory and the identity of the calibration data (:func:`file_sha256` of the JSONL, better
:func:`tensors_sha256` of the processed samples, which also covers images, processor, seed and sample
count). Output paths and cosmetic flags (``--quiet``, ``--report``) should be left out: they do not
change the result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from tlq.config import ConfigError, WeightQuantSpec
from tlq.engine import distributed as D
from tlq.quant.quantizer import QuantizedWeight

FORMAT_VERSION = 1
STATE_FILE = "state.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = "lock"
DEFAULT_CHUNK_BYTES = 1 << 30
SMALL_FILE_BYTES = 64 << 20  # model files up to this size are hashed whole
SAMPLE_BLOCKS = 16  # big model files: sha256 of this many evenly spaced blocks ...
SAMPLE_BLOCK_BYTES = 1 << 16  # ... of this size, plus the safetensors header


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: give JSON-like values (dicts, lists, str, numbers)")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII: the same data always gives the same text."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def run_fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts`` (config, model identity, calibration identity...)."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: Iterable[Tensor]) -> str:
    """sha256 of dtypes, shapes and bytes of the tensors, in order (e.g. every sample's processed inputs)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the safetensors header (names, dtypes, shapes, offsets) and evenly spaced blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            h.update(head + f.read(min(n, size - 8)))
        for k in range(SAMPLE_BLOCKS):
            offset = (size - SAMPLE_BLOCK_BYTES) * k // max(SAMPLE_BLOCKS - 1, 1) if size > SAMPLE_BLOCK_BYTES else 0
            f.seek(max(offset, 0))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def model_identity(model_dir: str | Path, *, full_hash: bool = False) -> dict[str, Any]:
    """What identifies a model directory's content, cheaply: ``{relative path: {size, sha256}}``.

    Small files (config.json, tokenizer, processor, chat template, weight index) are hashed whole. Weight
    files are identified by their size and a *sampled* hash (the safetensors header plus 16 evenly spaced
    64 KiB blocks), which reads a few MB instead of tens of GB at every start, yet changes for any
    re-trained or re-converted checkpoint (new weights change every block; a new layout changes the
    header). Modification times are deliberately ignored: copying or re-downloading the same model must
    not refuse to resume, and a same-size, different-content file (a fine-tune of the same architecture)
    must refuse, which sizes or mtimes alone would not guarantee. ``full_hash=True`` hashes everything.
    Hidden files and directories (``.git``, ``.cache``) are skipped.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"model directory {str(root)!r} does not exist")
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        size = path.stat().st_size
        if full_hash or size <= SMALL_FILE_BYTES:
            out[rel.as_posix()] = {"size": size, "sha256": file_sha256(path)}
        else:
            out[rel.as_posix()] = {"size": size, "sampled_sha256": _sampled_sha256(path, size)}
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"{value[:12]}..."  # a hash: its head is enough to tell them apart
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """Human-readable differences between two ``parts`` dicts (flattened with dotted keys)."""
    a, b = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if key not in b:
            changes.append(f"{key} was {_show(a[key])} and is now absent")
        elif key not in a:
            changes.append(f"{key} is new ({_show(b[key])})")
        elif a[key] != b[key]:
            changes.append(f"{key} changed from {_show(a[key])} to {_show(b[key])}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"and {len(changes) - limit} more"]
    return changes


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary sibling, fsync it, rename it over ``path``, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1) + "\n"
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    owned = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage: copy those (only those; streams can be big)
    storages: dict[int, int] = {}
    for t in owned.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
    owned = {k: t.clone() if t.numel() and storages[t.untyped_storage().data_ptr()] > 1 else t for k, t in owned.items()}
    _atomic_write(path, lambda p: save_file(owned, str(p), metadata={"format": f"tlq-resume-{FORMAT_VERSION}"}))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# Resume state
# --------------------------------------------------------------------------------------------------


class ResumeState:
    """Checkpoints of a layer-wise calibration, one decoder layer at a time (see the module docstring).

    ``fingerprint`` identifies the run (:func:`run_fingerprint`); pass the ``parts`` it came from too, so
    that a refusal can say what changed. ``ctx`` defaults to the current distributed context.
    """

    def __init__(self, dir: str | Path, fingerprint: str, parts: dict[str, Any] | None = None, *, ctx: D.DistContext | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if parts is not None and run_fingerprint(parts) != fingerprint:
            raise ValueError("fingerprint does not match parts: pass run_fingerprint(parts)")
        self.dir = Path(dir)
        self.fingerprint = fingerprint
        self.parts = _jsonable(parts) if parts is not None else None
        self.ctx = ctx or D.current_context()
        self.chunk_bytes = chunk_bytes
        self._completed: int | None = None
        self.created = False  # this run made the directory (so a refused run can take it back)
        self._lock_fd: int | None = None
        self._lock_finalizer: weakref.finalize | None = None

    # --- paths --------------------------------------------------------------------------------------
    def _layer_path(self, index: int, kind: str) -> Path:
        return self.dir / "layers" / f"L{index:05d}.{kind}"

    def _stream_index(self, index: int, rank: int) -> Path:
        return self.dir / "streams" / f"L{index:05d}.r{rank:03d}.json"

    def _stream_chunk(self, index: int, rank: int, chunk: int) -> Path:
        return self.dir / "streams" / f"L{index:05d}.r{rank:03d}.c{chunk:03d}.safetensors"

    # --- open / validate ----------------------------------------------------------------------------
    def open(self, overwrite: bool = False) -> int:
        """Create the directory, or validate an existing one; returns the number of finished layers.

        Collective. Raises ``ConfigError`` (on every rank) when the directory belongs to a different run
        (naming what changed), to a different world size, or is not a resume directory at all.
        ``overwrite=True`` discards an existing resume directory and starts over.
        """
        outcome: tuple[str, Any] = ("ok", 0)
        local_exc: BaseException | None = None
        if self.ctx.is_main:
            try:
                outcome = ("ok", self._open_main(overwrite))
            except ConfigError as exc:
                outcome, local_exc = ("config", str(exc)), exc
            except Exception as exc:  # let the other ranks fail too instead of waiting for a timeout
                outcome, local_exc = ("error", f"{type(exc).__name__}: {exc}"), exc
        outcome = D.broadcast_object(outcome)
        if local_exc is not None:
            raise local_exc
        kind, value = outcome
        if kind == "config":
            raise ConfigError(value)
        if kind == "error":
            raise RuntimeError(f"rank 0 could not open the resume directory {str(self.dir)!r}: {value}")
        self._completed = int(value)
        return self._completed

    def _open_main(self, overwrite: bool) -> int:
        d = self.dir
        if d.exists() and not d.is_dir():
            raise ConfigError(f"resume directory {str(d)!r} exists and is not a directory")
        ours = d.is_dir() and (d / STATE_FILE).is_file()
        self.created = not d.exists()
        if d.is_dir() and not ours and any(c.name != LOCK_FILE and not c.name.endswith(".tmp") for c in d.iterdir()):
            raise ConfigError(f"{str(d)!r} is not a TLQ resume directory (no {STATE_FILE}) and is not empty; choose another path")
        d.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if overwrite:
                for child in d.iterdir():
                    if child.name != LOCK_FILE:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            state_path = d / STATE_FILE
            if state_path.is_file():
                self._validate(_read_json(state_path))
            else:
                _write_json(state_path, {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "parts": self.parts, "world_size": self.ctx.world_size})
            completed = self._read_progress()
            self._remove_stale(completed)
        except BaseException:
            self.close()  # a refused run must not keep the directory locked
            raise
        return completed

    def _validate(self, state: dict[str, Any]) -> None:
        where = f"cannot resume from {str(self.dir)!r}"
        fix = "pass --overwrite to start over, or rerun the original command to resume"
        if state.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{where}: it was written by another TLQ version (format {state.get('format')}, expected {FORMAT_VERSION}); pass --overwrite to start over")
        if state.get("fingerprint") != self.fingerprint:
            old_parts = state.get("parts")
            if old_parts is not None and self.parts is not None:
                changes = describe_changes(old_parts, self.parts)
            else:
                changes = []
            what = "; ".join(changes) if changes else f"the command line or input changed (fingerprint {state.get('fingerprint', '?')[:12]}... vs {self.fingerprint[:12]}...)"
            raise ConfigError(f"{where}: {what}; {fix}")
        if state.get("world_size") != self.ctx.world_size:
            raise ConfigError(
                f"{where}: it was started with {state.get('world_size')} process(es), this run has {self.ctx.world_size} "
                f"(activations are sharded per rank); resume with {state.get('world_size')} process(es), or pass --overwrite to start over"
            )

    def _read_progress(self) -> int:
        path = self.dir / PROGRESS_FILE
        if not path.is_file():
            return 0
        progress = _read_json(path)
        if progress.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"resume directory {str(self.dir)!r} is inconsistent ({PROGRESS_FILE} belongs to another run); pass --overwrite to start over")
        completed = int(progress["completed_layers"])
        for i in range(completed):
            for kind in ("state.safetensors", "quant.safetensors", "json"):
                if not self._layer_path(i, kind).is_file():
                    raise ConfigError(f"resume directory {str(self.dir)!r} is damaged ({self._layer_path(i, kind).name} is missing); pass --overwrite to start over")
        return completed

    def _remove_stale(self, completed: int) -> None:
        """Temporary files, layers beyond the marker (a crashed save) and streams older than the newest."""
        for sub in (self.dir, self.dir / "layers", self.dir / "streams"):
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                    continue
                if sub.name in ("layers", "streams") and f.name[:1] == "L" and f.name[1:6].isdigit():
                    index = int(f.name[1:6])
                    keep = index < completed if sub.name == "layers" else index == completed - 1
                    if not keep:
                        f.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"resume directory {str(self.dir)!r} is in use by another running tlq process") from None
        self._lock_fd = fd
        self._lock_finalizer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        """Release the directory lock (the files stay, for a later resume)."""
        if self._lock_finalizer is not None:
            self._lock_finalizer()
        self._lock_fd = self._lock_finalizer = None

    # --- progress -----------------------------------------------------------------------------------
    def completed_layers(self) -> int:
        """How many decoder layers are finished (layers ``0 .. n-1``), as of :meth:`open` / the last save."""
        if self._completed is None:
            raise RuntimeError("call open() first")
        return self._completed

    def save_layer(self, index: int, layer_state: Mapping[str, Tensor], quantized: Mapping[str, QuantizedWeight], streams: Mapping[str, Sequence[Tensor]] | None, report: Mapping[str, Any]) -> None:
        """Record layer ``index`` as finished. Collective.

        ``layer_state`` (the layer's ``state_dict()``), ``quantized`` and ``report`` (JSON-like; NaN is
        fine) are written by rank 0, ``streams`` (this rank's activations *after* the layer, e.g.
        ``{"x_fp": [...], "x_q": [...]}``; lists or ``ActivationStore``s) by every rank; the marker last.
        """
        completed = self.completed_layers()
        if index != completed:
            raise ValueError(f"layers must be saved in order: expected layer {completed}, got {index}")
        D.collective_step(lambda: self._save_streams(index, streams or {}), f"saving the activations after layer {index}")
        # every rank's streams are durable: rank 0 writes the layer, then the marker
        D.collective_step(lambda: self._save_layer_main(index, layer_state, quantized, report) if self.ctx.is_main else None, f"saving layer {index}")
        self._completed = index + 1
        if index > 0:
            self._remove_streams(index - 1)

    def _save_layer_main(self, index: int, layer_state: Mapping[str, Tensor], quantized: Mapping[str, QuantizedWeight], report: Mapping[str, Any]) -> None:
        state_path, quant_path = self._layer_path(index, "state.safetensors"), self._layer_path(index, "quant.safetensors")
        _write_safetensors(state_path, dict(layer_state))
        qtensors: dict[str, Tensor] = {}
        for name, qw in quantized.items():
            qtensors[f"{name}.codes"], qtensors[f"{name}.scale"], qtensors[f"{name}.zero_point"] = qw.codes, qw.scale, qw.zero_point
        _write_safetensors(quant_path, qtensors)
        _write_json(self._layer_path(index, "json"), {
            "index": index,
            "state_keys": list(layer_state.keys()),
            "quantized": {name: dataclasses.asdict(qw.spec) for name, qw in quantized.items()},
            "report": _jsonable(dict(report)),
            "sha256": {state_path.name: file_sha256(state_path), quant_path.name: file_sha256(quant_path)},
        })
        _write_json(self.dir / PROGRESS_FILE, {"completed_layers": index + 1, "fingerprint": self.fingerprint, "world_size": self.ctx.world_size})

    def load_layer(self, index: int, *, verify: bool = True) -> tuple[dict[str, Tensor], dict[str, QuantizedWeight], dict[str, Any]]:
        """``(layer_state, quantized, report)`` of a finished layer, in the order they were saved."""
        if index >= self.completed_layers():
            raise ValueError(f"layer {index} is not finished (finished: {self.completed_layers()})")
        meta = _read_json(self._layer_path(index, "json"))
        paths = [self._layer_path(index, "state.safetensors"), self._layer_path(index, "quant.safetensors")]
        if verify:
            for p in paths:
                if file_sha256(p) != meta["sha256"][p.name]:
                    raise ConfigError(f"resume directory {str(self.dir)!r} is damaged ({p.name} does not match its checksum); pass --overwrite to start over")
        state_raw, quant_raw = load_file(str(paths[0])), load_file(str(paths[1]))
        layer_state = {k: state_raw[k] for k in meta["state_keys"]}
        quantized = {
            name: QuantizedWeight(quant_raw[f"{name}.codes"], quant_raw[f"{name}.scale"], quant_raw[f"{name}.zero_point"], WeightQuantSpec(**spec))
            for name, spec in meta["quantized"].items()
        }
        return layer_state, quantized, meta["report"]

    # --- streams ------------------------------------------------------------------------------------
    def _save_streams(self, index: int, streams: Mapping[str, Sequence[Tensor]]) -> None:
        rank = self.ctx.rank
        chunks: list[str] = []
        layout: dict[str, list[str]] = {}
        seen: dict[int, tuple[weakref.ref, str]] = {}  # id -> (weakref, key): the same tensor object is stored once
        pending: dict[str, Tensor] = {}
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            path = self._stream_chunk(index, rank, len(chunks))
            _write_safetensors(path, pending)
            chunks.append(path.name)
            pending, pending_bytes = {}, 0

        for s, (name, tensors) in enumerate(streams.items()):
            keys = layout.setdefault(name, [])
            for i, t in enumerate(tensors):
                hit = seen.get(id(t))
                if hit is not None and hit[0]() is t:
                    keys.append(hit[1])
                    continue
                key = f"{s}.{i}"  # stream number . position
                seen[id(t)] = (weakref.ref(t), key)
                keys.append(key)
                pending[key] = t
                pending_bytes += t.numel() * t.element_size()
                if pending_bytes >= self.chunk_bytes:
                    flush()
        flush()
        _write_json(self._stream_index(index, rank), {"layer": index, "rank": rank, "world_size": self.ctx.world_size, "chunks": chunks, "streams": layout})

    def load_streams(self, index: int, container: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """This rank's activations after layer ``index`` (the newest finished layer), ``{name: list}``.

        ``container(name)`` makes the object each stream is appended to (default: a list); pass e.g.
        ``lambda _: ActivationStore(budget, spill_dir)`` to reload under the memory budget.
        """
        if index != self.completed_layers() - 1:
            raise ValueError(f"only the newest finished layer's streams are kept (layer {self.completed_layers() - 1}), not layer {index}'s")
        path = self._stream_index(index, self.ctx.rank)
        if not path.is_file():
            raise ConfigError(f"resume directory {str(self.dir)!r} has no activations of rank {self.ctx.rank} after layer {index}; pass --overwrite to start over")
        meta = _read_json(path)
        handles = [safe_open(str(path.parent / c), framework="pt") for c in meta["chunks"]]
        where: dict[str, Any] = {}
        for h in handles:
            for key in h.keys():
                where[key] = h
        names = list(meta["streams"])
        out: dict[str, Any] = {}
        for s, name in enumerate(names):
            dest = container(name) if container is not None else []
            for key in meta["streams"][name]:
                owner, pos = (int(v) for v in key.split("."))
                earlier = out.get(names[owner]) if owner != s else None
                if isinstance(earlier, list):  # the same tensor object was saved in two streams: share it again
                    dest.append(earlier[pos])
                else:
                    dest.append(where[key].get_tensor(key))
            out[name] = dest
        return out

    def _remove_streams(self, index: int) -> None:
        d = self.dir / "streams"
        if not d.is_dir():
            return
        for f in d.glob(f"L{index:05d}.r{self.ctx.rank:03d}.*"):
            f.unlink(missing_ok=True)

    # --- end ----------------------------------------------------------------------------------------
    def discard_if_unused(self) -> None:
        """After a failed run: remove the directory if this run created it and finished no layer, so a
        refused run leaves nothing behind (a run that got further keeps its layers for the resume)."""
        self.close()
        if self.created and not self._completed and self.ctx.is_main:  # not collective: ranks may fail apart
            shutil.rmtree(self.dir, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove the whole resume directory (after a successful export). Collective."""
        D.barrier()
        if self.ctx.is_main:
            self.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        self._completed = None
        D.barrier()



def discard_stale_resume_dir(path: Path) -> bool:
    """Remove an earlier run's resume directory at ``path`` (one with a state file and no live owner:
    its lock is free). A successful run calls this for its own ``--out``'s resume directory, which a
    ``--no-resume`` run or a run of another command would otherwise leave behind forever."""
    if not (path / STATE_FILE).is_file():
        return False
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a running tlq owns it
    finally:
        os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    return True
