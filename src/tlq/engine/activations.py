"""Calibration activations under a CPU memory budget (``--max-cpu-memory``), spilling to disk beyond it.

The layer-wise engine keeps per-sample hidden states on CPU (the FP and quantized streams, and the next
layer's outputs while they are produced). :class:`ActivationStore` is a list of per-sample tensors that
keeps them in RAM while a byte budget allows, and writes the rest to safetensors files in a private
temporary directory, loading them back transparently (bit-exactly) on access.

Spill policy: when a tensor does not fit, *that* (newest) tensor is spilled; tensors already in RAM stay
there. The engine reads every stream front to back several times per layer (targets, statistics, each
scale-search candidate, the quantized pass), and for such cyclic scans keeping a fixed prefix resident is
the best a cache of that size can do (an LRU would evict each item just before it is needed again and
miss on every access). Several stores can share one :class:`MemoryBudget`, which is what bounds *all*
the activations the engine holds at once (both streams plus the outputs being built).

Cleanup: the temporary directory is removed by :meth:`ActivationStore.close` (also via ``with``, on an
exception too), and failing that when the store is garbage-collected or the interpreter exits. A process
killed by a signal Python cannot handle leaves it behind; :func:`sweep_stale_spill_dirs` removes such
leftovers of dead processes of this host at the next start.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from tlq.utils.io import process_tag, sweep_dead_owner_dirs

SPILL_PREFIX = "tlq-act-"





class MemoryBudget:
    """A byte budget shared by several stores (thread-safe); ``max_bytes=None`` is unlimited."""

    def __init__(self, max_bytes: int | None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.max_bytes is not None and self.used + nbytes > self.max_bytes:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)


@dataclass(frozen=True)
class _Spilled:
    path: Path
    nbytes: int


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ActivationStore:
    """A list of per-sample tensors kept in RAM up to a budget, spilled to disk beyond it.

    ``max_cpu_bytes``: an int (this store's own budget), a shared :class:`MemoryBudget`, or None
    (unlimited: never touches the disk). ``spill_dir``: where the private temporary directory is made
    (default: the system temp dir, ``$TMPDIR``). Appended tensors are moved to CPU (not copied when they
    already are); callers should append tensors that own their storage (not views of bigger ones),
    since the budget counts ``numel * element_size``.
    """

    def __init__(self, max_cpu_bytes: int | MemoryBudget | None = None, spill_dir: str | Path | None = None) -> None:
        self.budget = max_cpu_bytes if isinstance(max_cpu_bytes, MemoryBudget) else MemoryBudget(max_cpu_bytes)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._items: list[Tensor | _Spilled] = []
        self._dir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._counter = 0
        self._in_memory = 0
        self._closed = False

    # --- list interface -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int | slice) -> Tensor | list[Tensor]:
        self._check_open()
        if isinstance(index, slice):
            return [self._load(item) for item in self._items[index]]
        return self._load(self._items[index])

    def __setitem__(self, index: int, tensor: Tensor) -> None:
        self._check_open()
        old = self._items[index]
        self._items[index] = self._place(tensor)
        self._drop(old)

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def append(self, tensor: Tensor) -> None:
        self._check_open()
        self._items.append(self._place(tensor))

    def extend(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            self.append(t)

    # --- accounting -----------------------------------------------------------------------------------
    @property
    def nbytes_in_memory(self) -> int:
        return self._in_memory

    @property
    def num_spilled(self) -> int:
        return sum(isinstance(item, _Spilled) for item in self._items)

    @property
    def nbytes_spilled(self) -> int:
        return sum(item.nbytes for item in self._items if isinstance(item, _Spilled))

    def is_spilled(self, index: int) -> bool:
        return isinstance(self._items[index], _Spilled)

    @property
    def spill_path(self) -> Path | None:
        """The temporary directory, once something was spilled (None before and after close)."""
        return self._dir

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Forget every tensor, give the budget back and remove the temporary directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.budget.release(self._in_memory)
        self._in_memory = 0
        self._items.clear()
        if self._finalizer is not None:
            self._finalizer()  # removes the directory (once)
        self._dir = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ActivationStore(len={len(self)}, in_memory={self._in_memory}B, spilled={self.num_spilled})"

    # --- internals ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ActivationStore is closed")

    def _place(self, tensor: Tensor) -> Tensor | _Spilled:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"ActivationStore holds tensors, got {type(tensor).__name__}")
        t = tensor.detach() if tensor.requires_grad else tensor
        if t.device.type != "cpu":
            t = t.to("cpu")
        n = _nbytes(t)
        if self.budget.try_reserve(n):
            self._in_memory += n
            return t
        return self._spill(t, n)

    def _spill(self, t: Tensor, n: int) -> _Spilled:
        if self._dir is None:
            base = self.spill_dir
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            prefix = f"{SPILL_PREFIX}{process_tag()}-"
            path = tempfile.mkdtemp(prefix=prefix, dir=base)
            self._dir = Path(path)
            self._finalizer = weakref.finalize(self, _remove_dir, path)
        path = self._dir / f"{self._counter:08d}.safetensors"
        self._counter += 1
        save_file({"t": t.contiguous()}, str(path))
        return _Spilled(path, n)

    def _load(self, item: Tensor | _Spilled) -> Tensor:
        if isinstance(item, _Spilled):
            return load_file(str(item.path))["t"]
        return item

    def _drop(self, item: Tensor | _Spilled) -> None:
        if isinstance(item, _Spilled):
            item.path.unlink(missing_ok=True)
        else:
            n = _nbytes(item)
            self._in_memory -= n
            self.budget.release(n)


def activation_list(tensors: Iterable[Tensor], budget: MemoryBudget | None, spill_dir: str | Path | None = None) -> list[Tensor] | ActivationStore:
    """Per-sample activations: a plain list without a budget, else an ``ActivationStore`` sharing
    ``budget`` (spilling to ``spill_dir`` beyond it). The engine's streams and the streamed importance
    pass's layer inputs are both kept this way."""
    if budget is None:
        return list(tensors)
    store = ActivationStore(budget, spill_dir)
    store.extend(tensors)
    return store


def sweep_stale_spill_dirs(spill_dir: str | Path | None = None) -> list[Path]:
    """Remove spill directories left by dead processes of this host; returns what was removed."""
    return sweep_dead_owner_dirs(spill_dir if spill_dir is not None else tempfile.gettempdir(), SPILL_PREFIX)


__all__ = ["ActivationStore", "MemoryBudget", "activation_list", "sweep_stale_spill_dirs"]


def release_store(store: object, keep: tuple = ()) -> None:
    """Close a spilling store (removing its files) unless it is still in use (one of ``keep``); a plain
    list or ``None`` needs nothing."""
    if isinstance(store, ActivationStore) and not any(store is k for k in keep):
        store.close()


class Prefix:
    """The first ``n`` items of a per-sample sequence, without copying (a spilling store stays on disk).

    Why: a step or stream that runs on the globally first samples only (the scale search's
    ``max_samples``, the report's ``error_samples``) reads this rank's share of them, a prefix of its list."""

    def __init__(self, seq: Any, n: int) -> None:
        self.seq, self.n = seq, min(n, len(seq))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.seq[i]

    def __iter__(self) -> Any:
        return (self.seq[i] for i in range(self.n))
