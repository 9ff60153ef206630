"""Distributed calibration on ``torch.distributed``: process group, sample sharding, reductions, launcher.

Running it
----------
One machine, N processes (one per GPU, or N CPU processes with gloo)::

    torchrun --standalone --nproc_per_node N -m tlq quantize --model ... --out ...
    tlq quantize --nproc N --model ... --out ...          # the same thing; see launch_torchrun

Several machines: start the *same* command on every node with torchrun's own flags (the ``--nproc``
shortcut is single-node only)::

    # on each of the 2 nodes, node_rank 0 and 1:
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 4 \\
             --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --rdzv_id tlq-job \\
             -m tlq quantize --model ... --out /shared/out

The model directory, the calibration file and the resume directory must be visible at the same path on
every node (a shared filesystem); only rank 0 writes outputs.

How the work is split
---------------------
Calibration samples are sharded over ranks (:func:`shard_indices`); each rank runs the current decoder
layer on its own samples only, and every statistic that the layer's decisions depend on is summed (or
maxed) over ranks *before* the decision is taken, so that every rank solves the same problem and gets
the same quantized weights: weighted Hessians (:func:`reduce_hessian_`), the FP target's cross
statistics (:func:`reduce_cross_`), channel statistics (:func:`reduce_channel_stats_`), scale-search
losses (:func:`all_reduce_scalar_sum`) and activation maxima (:func:`all_reduce_max_`).

Reproducibility: sums are formed, reduced and kept in float64 (:func:`all_reduce_sum_` upcasts
lower-precision floating tensors for the reduction). Sharding only re-brackets the single-process sum
(sample partials are summed per rank, then rank partials are summed), so the distributed result equals
the single-process one to float64 rounding (~1e-15 relative, far below what the solvers resolve), and
it is exactly reproducible for a fixed world size. Maxima are exact in any order. The reduced value is
bitwise the same on every rank (ring/tree all-reduce reduces each element once and broadcasts it);
:func:`assert_same_across_ranks` checks that cheaply where a divergence would be costly.

Every collective here must be called by *every* rank in the same order, including ranks whose shard is
empty (``n < world_size``): they contribute zeros. All helpers are no-ops in a single process and make
no ``torch.distributed`` calls at all then.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

from tlq.config import ConfigError

# How long a collective waits for the slowest rank. Rank 0 writes checkpoints while the others wait at a
# barrier, and one layer's solve can take minutes on big models: torch's defaults (10 min for NCCL) are
# too short. Override with TLQ_DIST_TIMEOUT (seconds).
DEFAULT_TIMEOUT_S = 3600.0

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process stands in the job. ``backend`` is None in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False  # whether init_distributed created the process group (shutdown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device_for(self, device: torch.device | str) -> torch.device:
        """The device this rank computes on: with several processes, CUDA means ``cuda:LOCAL_RANK``.

        Under torchrun every process sees all the node's GPUs, so a plain ``cuda`` (``cuda:0``) would put
        every rank on the first GPU. An explicit ``cuda:N`` is honoured only in a single process.
        """
        dev = torch.device(device)
        if dev.type != "cuda" or not self.enabled:
            return dev
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ConfigError(
                f"rank {self.rank} has LOCAL_RANK {self.local_rank} but only {count} CUDA device(s) are visible; "
                f"start at most {count} processes per node (--nproc_per_node), or use --device cpu"
            )
        return torch.device("cuda", self.local_rank)


_CONTEXT: DistContext | None = None


def current_context() -> DistContext:
    """The context set by :func:`init_distributed` (a single-process one before that)."""
    if _CONTEXT is not None:
        return _CONTEXT
    return DistContext()


def _active() -> bool:
    # Only queries, never collectives: "not distributed" must not touch the process group at all.
    if _CONTEXT is not None and not _CONTEXT.enabled:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(
            f"WORLD_SIZE > 1 but {name} is not set: start distributed runs with torchrun "
            f"(or `tlq quantize --nproc N`), which sets {', '.join(_TORCHRUN_VARS)}"
        )
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _wants_cuda(device_hint: torch.device | str | None) -> bool:
    if device_hint is None or str(device_hint) == "auto":
        return torch.cuda.is_available()
    return torch.device(device_hint).type == "cuda"


def choose_backend(device_hint: torch.device | str | None) -> str:
    """``nccl`` when CUDA is requested (or ``auto``) and available, else ``gloo``; ``TLQ_DIST_BACKEND`` overrides."""
    forced = os.environ.get("TLQ_DIST_BACKEND")
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ConfigError(f"TLQ_DIST_BACKEND must be gloo or nccl, got {forced!r}")
        return forced
    if _wants_cuda(device_hint):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if dist.is_nccl_available():
            return "nccl"
    return "gloo"


def init_distributed(device_hint: torch.device | str | None = "auto", *, timeout_s: float | None = None) -> DistContext:
    """Join the torchrun job described by the environment, or return a single-process context.

    With ``WORLD_SIZE`` unset or 1 nothing in ``torch.distributed`` is called. Otherwise the process group
    is created from torchrun's variables (``env://``): NCCL when CUDA is requested/available (the rank's GPU
    becomes ``cuda:LOCAL_RANK``), else gloo. A process group that already exists is reused (and left alone
    by :func:`shutdown`). Idempotent.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world_size <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if dist.is_initialized():
        _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), str(dist.get_backend()))
        return _CONTEXT
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"WORLD_SIZE > 1 but {name} is not set: start distributed runs with torchrun (or `tlq quantize --nproc N`)")
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK {rank} is outside [0, WORLD_SIZE={world_size})")
    backend = choose_backend(device_hint)
    if timeout_s is None:
        timeout_s = float(os.environ.get("TLQ_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        ctx = DistContext(rank, world_size, local_rank, backend)
        device = ctx.device_for("cuda")  # validates LOCAL_RANK against the visible GPUs
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs)
    _CONTEXT = DistContext(rank, world_size, local_rank, backend, initialized_here=True)
    # A process group still alive at interpreter teardown can abort the process: gloo's worker threads
    # release tensors (and take the GIL) while Python is being finalised -> "terminate called without an
    # active exception", SIGABRT (pytorch/pytorch#190489). Destroy it while the interpreter is whole,
    # whichever way the process ends (normal return, exception, SIGTERM via raise_on_sigterm).
    atexit.register(shutdown)
    return _CONTEXT


def exit_rank(code: int) -> NoReturn:
    """End a rank's process with ``code``: everything Python does at exit, then no C-level teardown.

    Why: with the gloo group destroyed (:func:`shutdown`) and no Python left to run, a rank still aborted
    in the interpreter's final teardown ("terminate called without an active exception", SIGABRT, the
    main thread with no Python frame) in 1 of 30 two-rank runs of a tiny model, and torchrun then reports
    the whole job failed although its output was complete. The exit handlers (this module's
    :func:`shutdown`, the spill directories' finalizers) and the streams run and flush as on a normal exit;
    only the destruction of native objects at exit, which a finishing rank has no use for, is skipped.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def shutdown() -> None:
    """Destroy the process group if :func:`init_distributed` created it; forget the context.

    Idempotent; also registered with :mod:`atexit` by :func:`init_distributed`.
    """
    global _CONTEXT
    ctx, _CONTEXT = _CONTEXT, None
    if ctx is not None and ctx.initialized_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------


def shard_indices(n: int, ctx: DistContext | None = None, *, costs: Sequence[float] | None = None) -> list[int]:
    """This rank's calibration samples: a deterministic **contiguous** block of ``range(n)``.

    Contiguous (not strided) so that the reduced statistics are the single-process sum re-bracketed at
    ``world_size - 1`` block boundaries, with the addends in the same order; each rank also visits its
    samples in global order, and rank order = sample order makes the layout easy to reason about
    (``torch.cat`` of the ranks' outputs is the single-process list). Blocks differ in size by at most
    one sample (``numpy.array_split`` convention). With ``costs`` (e.g. token counts, one per sample)
    the cut points balance the summed cost instead, still contiguous and deterministic. Ranks beyond
    ``n`` get empty shards; they must still take part in every collective.
    """
    ctx = ctx or current_context()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    w, r = ctx.world_size, ctx.rank
    if costs is None:
        base, extra = divmod(n, w)
        start = r * base + min(r, extra)
        return list(range(start, start + base + (1 if r < extra else 0)))
    if len(costs) != n:
        raise ValueError(f"got {len(costs)} costs for {n} samples")
    if any(not (c >= 0) for c in costs):  # also rejects NaN
        raise ValueError("sample costs must be non-negative numbers")
    cum = [0.0]
    for c in costs:
        cum.append(cum[-1] + float(c))
    total = cum[-1]

    def cut(k: int) -> int:  # first index whose prefix cost reaches k/w of the total
        if k <= 0:
            return 0
        if k >= w:
            return n
        target = total * k / w
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] < target:
                lo = mid + 1
            else:
                hi = mid
        return lo

    return list(range(cut(r), cut(r + 1)))


# --------------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# --------------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_(t: Tensor, op: Any, work_dtype: torch.dtype | None) -> Tensor:
    """All-reduce ``t`` in place, through a copy on the backend's device / in ``work_dtype`` when needed."""
    work = t
    if work_dtype is not None and t.dtype != work_dtype:
        work = work.to(work_dtype)
    dev = _comm_device()
    if work.device != dev:
        work = work.to(dev)
    if not work.is_contiguous():
        work = work.contiguous()
    dist.all_reduce(work, op=op)
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks, in place; floating tensors are reduced in float64 (then cast back)."""
    if not _active():
        return t
    return _all_reduce_(t, dist.ReduceOp.SUM, torch.float64 if t.is_floating_point() else None)


def all_reduce_max_(t: Tensor) -> Tensor:
    """Element-wise max of ``t`` over ranks, in place (exact; half types go through float32)."""
    if not _active():
        return t
    wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return _all_reduce_(t, dist.ReduceOp.MAX, wide)


def all_reduce_scalar_sum(x: float) -> float:
    """Sum of a Python number over ranks, in float64 (scale-search losses, error numerators...)."""
    if not _active():
        return float(x)
    return float(_all_reduce_(torch.tensor([float(x)], dtype=torch.float64), dist.ReduceOp.SUM, None)[0])


def all_reduce_scalars_sum(xs: Sequence[float]) -> list[float]:
    """:func:`all_reduce_scalar_sum` for several numbers in one collective (e.g. all grid losses at once)."""
    if not _active():
        return [float(x) for x in xs]
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    return [float(v) for v in _all_reduce_(t, dist.ReduceOp.SUM, None)]


def reduce_hessian_(acc: Any) -> Any:
    """Sum a ``HessianAccumulator``'s ``raw_sum``, ``total_weight`` and ``num_tokens`` over ranks, in place.

    Afterwards every rank holds the accumulator of the union of the shards (what one process fed every
    sample would hold, up to float64 rounding), so ``acc.hessian`` and the GPTQ solve agree everywhere.
    Call it exactly once per accumulator, after the last ``add`` and before ``hessian``.
    """
    if not _active():
        return acc
    all_reduce_sum_(acc.raw_sum)
    all_reduce_sum_(acc.total_weight)
    all_reduce_sum_(acc.num_tokens)
    return acc


def reduce_cross_(acc: Any) -> Any:
    """Sum a ``CrossAccumulator``'s ``raw_sum`` and ``total_weight`` over ranks, in place (the FP
    target's statistics, under the same contract as :func:`reduce_hessian_`)."""
    if not _active():
        return acc
    all_reduce_sum_(acc.raw_sum)
    all_reduce_sum_(acc.total_weight)
    return acc


def reduce_channel_stats_(acc: Any) -> Any:
    """Sum ``abs_sum`` and ``total``, max ``abs_max`` of a ``ChannelStatsAccumulator`` over ranks, in place.

    ``total`` may be a Python float (it is today) or a tensor.
    """
    if not _active():
        return acc
    all_reduce_sum_(acc.abs_sum)
    all_reduce_max_(acc.abs_max)
    if isinstance(acc.total, Tensor):
        all_reduce_sum_(acc.total)
    else:
        acc.total = all_reduce_scalar_sum(acc.total)
    return acc


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s values, in place (shapes/dtypes must match)."""
    if not _active():
        return t
    work = t
    dev = _comm_device()
    if work.device != dev or not work.is_contiguous():
        work = work.to(dev).contiguous()
    dist.broadcast(work, src=src)
    if work is not t:
        t.copy_(work)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (the argument is ignored on the others)."""
    if not _active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_step(fn: Any, what: str, *, main_only: bool = False) -> Any:
    """Run ``fn()`` (on rank 0 only with ``main_only``) and make every rank learn whether any rank failed.

    A plain ``barrier`` after a step that fails on one rank (disk full, a bad file) leaves the others
    waiting for the collective timeout; here the failing rank re-raises its own exception and every
    other rank raises ``RuntimeError`` naming it, right away. Collective; returns ``fn()``'s result
    (None on ranks that did not run it).
    """
    result, error, exc = None, None, None
    if not main_only or current_context().is_main or not _active():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            exc, error = e, f"{type(e).__name__}: {e}"
    if not _active():
        if exc is not None:
            raise exc
        return result
    errors = all_gather_object(error)
    if exc is not None:
        raise exc
    failed = [(r, m) for r, m in enumerate(errors) if m is not None]
    if failed:
        raise RuntimeError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")
    return result


def barrier() -> None:
    """Wait for every rank."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (bitwise identity)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def assert_same_across_ranks(what: str, *tensors: Tensor) -> None:
    """Raise on every rank if the tensors differ bitwise between ranks (a few bytes of traffic).

    A guard for "every rank takes the same decision": e.g. the codes of each solved layer.
    """
    if not _active():
        return
    digests = all_gather_object(tensor_digest(*tensors))
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"ranks disagree on {what}: ranks {differing} differ from rank 0 (non-deterministic reduction or solve)")


# --------------------------------------------------------------------------------------------------
# Launcher (`tlq quantize --nproc N`)
# --------------------------------------------------------------------------------------------------


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (only before a ``--`` separator)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out.extend(argv[i:])
            break
        if a == "--nproc":
            i += 2
            continue
        if not a.startswith("--nproc="):
            out.append(a)
        i += 1
    return out


def torchrun_command(nproc: int, argv: Sequence[str], log_dir: str | None = None) -> list[str]:
    """The command :func:`launch_torchrun` runs (single node, ``--standalone``: torchrun picks a free port;
    ``log_dir``: torchrun's base directory for its per-attempt log folders)."""
    logs = [] if log_dir is None else ["--log-dir", log_dir]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *logs,
            "-m", "tlq", *strip_nproc(argv)]


def launch_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this ``tlq`` command under torchrun with ``nproc`` processes on this node; its exit code.

    ``argv`` is the command line after ``tlq`` (``["quantize", "--model", ..., "--nproc", "4"]``); the
    ``--nproc`` option is removed. For several nodes use torchrun directly (module docstring).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc launches torchrun itself; this process already runs under torchrun: drop --nproc")
    # Without --log-dir, torchrun leaves a /tmp/torchelastic_* folder behind on every launch; tlq gives it a
    # temporary one of its own and removes it after (the workers' output goes to the console either way).
    with tempfile.TemporaryDirectory(prefix="tlq-torchrun-", ignore_cleanup_errors=True) as logs:  # workers may still be exiting
        try:
            return subprocess.run(torchrun_command(nproc, argv, logs), check=False).returncode
        except KeyboardInterrupt:  # the terminal's Ctrl-C reaches torchrun and its workers too
            return 130
