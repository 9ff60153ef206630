"""Quantization-exposed layer-wise calibration.

The decoder is calibrated one layer at a time with two streams of hidden states kept on CPU:

* the FP stream ``X_fp``: outputs of the original layers — the targets;
* the quantized stream ``X_q``: outputs of the already-quantized layers, with activation
  fake-quantization on for W-A schemes — the inputs the next layer will really see at inference.

Each layer collects its statistics on ``X_q`` (plain FP-input calibration, as AWQ/MBQ do, is kept as an
ablation), is solved, and then produces the next ``X_q``. Inside a layer the linears are solved in
execution order, group by group (linears that read the same tensor, e.g. q/k/v, form one group), so a
later group sees the error of the earlier ones ("true sequential").

A layer, in order: the FP stream, the method's steps (``QuantizeConfig.steps``, :mod:`tlq.engine.steps`:
scale search in :mod:`tlq.engine.smoothing`, statistics and solve in :mod:`tlq.engine.solve`), the
quantized stream. The steps share one :class:`tlq.engine.context.LayerContext` and hand their results on
in a :class:`tlq.engine.context.LayerState`.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tlq.config import QuantizeConfig
from tlq.engine import distributed as D
from tlq.engine.activations import MemoryBudget, Prefix, activation_list, release_store
from tlq.engine.context import LayerContext, LayerState, TokenWeightFn
from tlq.engine.checkpoint import ResumeState
from tlq.engine.distributed import DistContext
from tlq.data.calibration import CalibSample
from tlq.utils.finite import NonFiniteError, dtype_hint, is_finite
from tlq.utils.timing import PhaseClock
from tlq.engine.steps import check_steps
from tlq.models.base import LayerInputs, ModelAdapter, tree_to
from tlq.models.streaming import LayerSource, ResidentLayers
from tlq.quant.quantizer import QuantizedWeight, add_input_quantizer

# Called once per finished layer (also for layers restored from a resume state), while it is loaded:
# (layer index, layer module, {module name: QuantizedWeight}). A streamed export writes the layer here.
LayerSink = Callable[[int, nn.Module, dict[str, QuantizedWeight]], None]


@dataclass
class LayerReport:
    """What happened at one decoder layer."""

    index: int
    # ||L_q(X_q) - L_fp(X_fp)||^2 / ||L_fp(X_fp)||^2 over the calibration tokens of both streams (every sample,
    # or the first calib.error_samples where the method reads only one stream)
    rel_error: float
    seconds: float
    peak_mem_mb: float  # GPU peak on CUDA, else the process's peak RSS so far
    num_linears: int
    search_alphas: dict[str, float] = field(default_factory=dict)  # producer -> chosen exponent (NaN = unscaled)
    # MoE: positive-weight token rows each routed linear was solved on (name within the layer), and
    # which of them fell back to RTN (fewer than GPTQConfig.min_tokens or min_tokens_in rows)
    routed_tokens: dict[str, int] = field(default_factory=dict)
    rtn_fallback: list[str] = field(default_factory=list)


def count_rtn_fallbacks(layers: list[LayerReport]) -> int:
    """MoE: the routed expert linears, over ``layers``, that fell back to RTN for want of rows (0 when dense)."""
    return sum(len(layer.rtn_fallback) for layer in layers)


@dataclass
class EngineResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LayerwiseEngine:
    """Runs the two-stream, layer-by-layer calibration over a loaded model.

    Distributed: each rank holds its shard of the calibration samples (``sample_ids`` are their global
    indices); every statistic a decision depends on (Hessians, channel statistics, search losses,
    errors) is all-reduced, so all ranks take identical decisions. Resume: with a ``ResumeState``, each
    finished layer (its weights, quantized codes, report and the two streams after it) is checkpointed,
    and a restarted run continues after the last finished layer. Memory: with a ``MemoryBudget``, the
    streams live in ``ActivationStore``s that spill to disk beyond the budget. Streaming: ``layers`` (a
    ``tlq.models.streaming`` layer source) hands out one decoder layer at a time and takes it back when
    it is finished; ``sink`` then receives each finished layer, and with ``keep_codes=False`` the codes
    are not kept in the result (the sink has written them), so nothing grows with depth.
    """

    def __init__(self, adapter: ModelAdapter, model: nn.Module, config: QuantizeConfig, device: torch.device, scale_dtype: torch.dtype | None = None, token_weights: TokenWeightFn | None = None, progress: bool = True, ctx: DistContext | None = None, budget: MemoryBudget | None = None, spill_dir: str | None = None, layers: LayerSource | None = None, sink: LayerSink | None = None, keep_codes: bool = True, clock: PhaseClock | None = None) -> None:
        self.adapter = adapter
        self.model = model
        self.config = config
        self.device = device
        self.scale_dtype = scale_dtype
        self.token_weights = token_weights
        self.progress = progress
        self.ctx = ctx or DistContext()
        self.budget = budget
        self.spill_dir = spill_dir
        self.layers = layers if layers is not None else ResidentLayers(adapter, model)
        self.sink = sink
        self.keep_codes = keep_codes
        self.clock = clock or PhaseClock()  # the run's phase times (QuantizeReport.phases)
        self.sample_ids: list[int] = []
        self.act_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.steps = check_steps(config.layer_steps())  # (phase, step) in the preset's order

    # --- public ------------------------------------------------------------------------------------
    def capture_inputs(self, samples: list[CalibSample]) -> list[LayerInputs]:
        return [self.adapter.capture_layer0_inputs(self.model, tree_to(s.inputs, self.device)) for s in samples]

    def calibrate(self, samples: list[CalibSample], sample_ids: list[int] | None = None, resume: ResumeState | None = None, inputs: list[LayerInputs] | None = None) -> EngineResult:
        """Calibrate every decoder layer; ``samples`` is this rank's shard (all of them in one process).
        ``inputs``: their layer-0 inputs (:meth:`capture_inputs`) when the caller captured them already;
        the list is handed over (emptied here), so that layer 0's activations are freed with its stream."""
        self.sample_ids = list(range(len(samples))) if sample_ids is None else list(sample_ids)
        if inputs is None:
            with self.clock("vision tower + layer-0 capture"):
                inputs = self.capture_inputs(samples)
        kwargs = [li.kwargs for li in inputs]
        between = [li.between for li in inputs]
        x_fp = self._store([li.hidden_states for li in inputs])
        x_q = x_fp
        inputs.clear()
        result = EngineResult()
        first = 0
        if resume is not None and resume.completed_layers() > 0:
            first = resume.completed_layers()
            self._restore(resume, first, result)
            streams = resume.load_streams(first - 1, container=lambda _name: self._store([]))
            release_store(x_fp)
            x_fp, x_q = streams["x_fp"], streams["x_q"]
        num_layers = len(self.layers)
        bar = tqdm(range(first, num_layers), desc="calibrating layers", unit="layer", disable=not self.progress or not self.ctx.is_main, initial=first, total=num_layers)
        try:
            for i in bar:
                layer = self.layers.load(i)
                fp_out, q_out, quantized, report = self._checked_layer(i, layer, x_fp, x_q, kwargs, between)
                result.layers.append(report)
                if resume is not None:
                    resume.save_layer(i, layer.state_dict(), quantized, {"x_fp": fp_out, "x_q": q_out}, asdict(report))
                    _fault_injection(i)
                self._finish_layer(i, layer, quantized, result)
                bar.set_postfix(rel_err=f"{report.rel_error:.2e}")
                release_store(x_fp, keep=(fp_out, q_out))
                release_store(x_q, keep=(fp_out, q_out))
                x_fp, x_q = fp_out, q_out
        finally:
            release_store(x_fp)
            release_store(x_q)
        return result

    def _layer(self, i: int, layer: nn.Module, x_fp: Any, x_q: Any, kwargs: list[dict[str, Any]], between: list[dict[str, Any]]) -> tuple[Any, Any, dict[str, QuantizedWeight], LayerReport]:
        start = time.perf_counter()
        ctx = self._context(i, layer, kwargs, between)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        read_fp, read_q = self.config.streams_read()
        with self.clock("FP stream"):
            fp_out = self._advance(i, layer, x_fp if read_fp else self._error_prefix(x_fp), kwargs, between)
        state = LayerState(x_fp, x_q)
        for phase, step in self.steps:
            with self.clock(phase):
                step(ctx, state)
        with self.clock("quantized stream"):
            q_out = self._advance(i, layer, x_q if read_q else self._error_prefix(x_q), kwargs, between)
        num, den = squared_error_sums(q_out, fp_out)
        num, den = D.all_reduce_scalars_sum([num, den])  # no-op in a single process
        peak = torch.tensor([peak_memory_mb(self.device)], dtype=torch.float64)
        D.all_reduce_max_(peak)
        report = LayerReport(
            index=i,
            rel_error=num / max(den, 1e-30),
            seconds=time.perf_counter() - start,
            peak_mem_mb=float(peak[0]),
            num_linears=len(state.quantized),
            search_alphas=state.search_alphas,
            routed_tokens=state.routed_tokens,
            rtn_fallback=state.rtn_fallback,
        )
        return fp_out, q_out, state.quantized, report

    def _checked_layer(self, i: int, layer: nn.Module, x_fp: Any, x_q: Any, kwargs: list[dict[str, Any]], between: list[dict[str, Any]]) -> tuple[Any, Any, dict[str, QuantizedWeight], LayerReport]:
        """:meth:`_layer`, with a NaN/Inf anywhere in it (Hessian, scales, outputs) named by its layer: it
        is then never checkpointed nor exported. Every rank sees the same reduced error, so all stop."""
        try:
            out = self._layer(i, layer, x_fp, x_q, kwargs, between)
        except NonFiniteError as exc:
            raise NonFiniteError(f"decoder layer {i}: {exc}") from None
        if not math.isfinite(out[3].rel_error):  # reduced over ranks: every rank stops here together
            stream = "FP" if not all(is_finite(t) for t in out[0]) else "quantized"  # failure path only: reads the stream
            dtype = next(layer.parameters()).dtype
            raise NonFiniteError(f"decoder layer {i}: non-finite values in its output ({stream} stream); {dtype_hint(dtype)}")
        return out

    def _finish_layer(self, i: int, layer: nn.Module, quantized: dict[str, QuantizedWeight], result: EngineResult) -> None:
        """Hand a finished layer to the sink, keep its codes (unless streaming), give it back to the source."""
        if self.sink is not None:
            self.sink(i, layer, quantized)
        if self.keep_codes:
            result.quantized.update(quantized)
        self.layers.release(i)

    def _restore(self, resume: ResumeState, upto: int, result: EngineResult) -> None:
        """Put finished layers back as they were saved: weights, codes, reports and activation quantizers."""
        for i in range(upto):
            state, quantized, report = resume.load_layer(i)
            layer = self.layers.load(i, state)
            result.layers.append(LayerReport(**report))
            if self.config.scheme.activations is not None:
                for name in quantized:
                    self.act_hooks.append(add_input_quantizer(self.model.get_submodule(name), self.config.scheme.activations))
            self._finish_layer(i, layer, quantized, result)

    def _store(self, tensors: list[Tensor]) -> Any:
        """A per-sample activation list: plain in RAM, or budgeted (spilling to disk) with --max-cpu-memory."""
        return activation_list(tensors, self.budget, self.spill_dir)

    # --- internals -------------------------------------------------------------------------------
    def _context(self, index: int, layer: nn.Module, kwargs: list[dict[str, Any]], between: list[dict[str, Any]]) -> LayerContext:
        """What this layer's steps share; its keyword arguments are the layer's own (e.g. its mask)."""
        own = [self.adapter.layer_kwargs(index, kw, b) for kw, b in zip(kwargs, between)]
        return LayerContext(index, layer, own, self.config, self.adapter, self.device, self.scale_dtype, self.sample_ids, self.token_weights, self._store,
                            self.ctx, self.act_hooks)

    def _dev(self, x: Any) -> Any:
        return tree_to(x, self.device)

    def _error_prefix(self, xs: Any) -> Any:
        """This rank's share of the globally first ``calib.error_samples`` samples of a stream that the
        method's steps do not read: it runs for the report's error only (a prefix of the rank's list, as
        sample ids are ascending; paired with the same prefix of the other stream by position)."""
        k = self.config.calib.error_samples
        return xs if k == 0 else Prefix(xs, sum(1 for sid in self.sample_ids if sid < k))

    @torch.no_grad()
    def _advance(self, index: int, layer: nn.Module, xs: Any, kwargs: list[dict[str, Any]], between: list[dict[str, Any]]) -> Any:
        """A stream one layer on: the next layer's inputs (the adapter's step: the layer, then whatever the
        model does before the next one). The streams are what the next layer sees, so they take the step."""
        return self._store([self.adapter.layer_step(index, layer, self._dev(x), self._dev(kw), b).to("cpu") for x, kw, b in zip(xs, kwargs, between)])

    def remove_activation_quantizers(self) -> None:
        for h in self.act_hooks:
            h.remove()
        self.act_hooks.clear()


def squared_error_sums(out: Any, ref: Any) -> tuple[float, float]:
    """``sum ||out - ref||^2`` and ``sum ||ref||^2`` over samples (summed across ranks by the caller)."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num, den


FAULT_ENV = "TLQ_FAULT_AFTER_LAYER"


def _fault_injection(index: int) -> None:
    """Kill this process (SIGKILL: no cleanup, like an OOM kill) after checkpointing layer ``index``.

    Only when ``TLQ_FAULT_AFTER_LAYER`` names that layer: the resume tests use it to crash a run at a
    known point. Unset, it does nothing.
    """
    if os.environ.get(FAULT_ENV) == str(index):
        os.kill(os.getpid(), signal.SIGKILL)
