"""Quantization-exposed layer-wise calibration.

The decoder is calibrated one layer at a time with two streams of hidden states kept on CPU:

* the FP stream ``X_fp``: outputs of the original layers — the targets;
* the quantized stream ``X_q``: outputs of the already-quantized layers, with activation
  fake-quantization on for W-A schemes — the inputs the next layer will really see at inference.

Each layer collects its statistics on ``X_q`` (plain FP-input calibration, as AWQ/MBQ do, is kept as an
ablation), is solved, and then produces the next ``X_q``. Inside a layer the linears are solved in
execution order, group by group (linears that read the same tensor, e.g. q/k/v, form one group), so a
later group sees the error of the earlier ones ("true sequential").

A layer's steps, in order: FP stream, scale search (:mod:`tlq.engine.smoothing`), statistics and solve
(GPTQ/RTN, per group), quantized stream. They share one :class:`tlq.engine.context.LayerContext`.
"""

from __future__ import annotations

import copy
import math
import os
import re
import resource
import signal
import time
from dataclasses import asdict, dataclass, field, replace as dc_replace
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tlq.config import QuantizeConfig
from tlq.engine import distributed as D
from tlq.engine.activations import MemoryBudget, activation_list, release_store
from tlq.engine.context import LayerContext, TokenWeightFn
from tlq.engine.checkpoint import ResumeState
from tlq.engine.distributed import DistContext
from tlq.data.calibration import CalibSample
from tlq.utils.finite import NonFiniteError, dtype_hint, is_finite
from tlq.utils.timing import PhaseClock
from tlq.engine.smoothing import search_layer_scales
from tlq.models.base import LayerInputs, ModelAdapter, run_layer, tree_to
from tlq.models.moe import RoutedLinear, rows_of
from tlq.models.streaming import LayerSource, ResidentLayers
from tlq.quant.quantizer import QuantizedWeight, add_input_quantizer
from tlq.quant.solvers import LinearCalibrator, make_calibrator

# Called once per finished layer (also for layers restored from a resume state), while it is loaded:
# (layer index, layer module, {module name: QuantizedWeight}). A streamed export writes the layer here.
LayerSink = Callable[[int, nn.Module, dict[str, QuantizedWeight]], None]


@dataclass
class LayerReport:
    """What happened at one decoder layer."""

    index: int
    rel_error: float  # ||L_q(X_q) - L_fp(X_fp)||^2 / ||L_fp(X_fp)||^2 over all calibration tokens
    seconds: float
    peak_mem_mb: float  # GPU peak on CUDA, else the process's peak RSS so far
    num_linears: int
    search_alphas: dict[str, float] = field(default_factory=dict)  # producer -> chosen exponent (NaN = unscaled)
    # MoE: positive-weight token rows each routed linear was solved on (name within the layer), and
    # which of them fell back to RTN (fewer than GPTQConfig.min_tokens rows)
    routed_tokens: dict[str, int] = field(default_factory=dict)
    rtn_fallback: list[str] = field(default_factory=list)


@dataclass
class EngineResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def linear_groups(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any], skip: Callable[[str], bool] = lambda _n: False) -> list[list[str]]:
    """Linears of ``layer`` in execution order, grouped by the tensor they read, without those ``skip``
    names (the adapter's 16-bit modules, e.g. Qwen3.5's ``in_proj_a/b``).

    Found by running the layer once with hooks, so no architecture needs listing. Inputs are kept
    referenced during the pass so that tensor identity cannot be confused by memory reuse.
    """
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not skip(n)}
    seen: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda _m, args, _o, n=n: seen.append((n, args[0]))) for n, m in linears.items()
    ]
    try:
        with torch.no_grad():
            run_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    owners: list[Tensor] = []
    for name, x in seen:
        for g, owner in zip(groups, owners):
            if owner is x:
                if name not in g:
                    g.append(name)
                break
        else:
            if not any(name in g for g in groups):
                groups.append([name])
                owners.append(x)
    return _merge_expert_stages(groups, linears)


def _expert_stage(name: str) -> str:
    """``mlp.experts.3.gate_proj`` -> ``mlp.experts.*.gate_proj``: the same linear of every expert."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _merge_expert_stages(groups: list[list[str]], linears: dict[str, nn.Module]) -> list[list[str]]:
    """One group per stage of a MoE block instead of one per expert, and every expert in it.

    Experts are independent of one another (each reads the block's input rows routed to it), so all
    experts' ``gate/up`` form one group and all ``down`` the next, in execution order: one observation
    pass per stage instead of one per expert, with the same statistics. Experts the discovery sample
    did not route to join their stage (or, with no routed expert at all, a group of their own at the
    end), so that every expert is calibrated.
    """
    out: list[list[str]] = []
    stage_of: dict[str, list[str]] = {}
    for group in groups:
        if not all(isinstance(linears[n], RoutedLinear) for n in group):
            out.append(group)
            continue
        key = " ".join(sorted(_expert_stage(n) for n in group))
        if key in stage_of:
            stage_of[key].extend(group)
        else:
            stage_of[key] = list(group)
            out.append(stage_of[key])
    placed = {n for g in out for n in g}
    by_linear = {stage: g for key, g in stage_of.items() for stage in key.split()}
    for name in linears:
        if name in placed or not isinstance(linears[name], RoutedLinear):
            continue
        group = by_linear.get(_expert_stage(name))
        if group is None:
            group = [name]
            out.append(group)
            by_linear[_expert_stage(name)] = group
        else:
            group.append(name)
        placed.add(name)
    return out


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
        with self.clock("FP stream"):
            fp_out = self._advance(i, layer, x_fp, kwargs, between)
        stats_in = x_q if self.config.quantized_inputs else x_fp
        with self.clock("scale search"):
            alphas = search_layer_scales(ctx, stats_in)
        # the FP target reads every linear's FP inputs from an FP copy taken after the (function-preserving)
        # scale folding, so that its inputs are in the same scaled coordinates as the quantized layer's;
        # passed without a local name here, so that _calibrate_layer can free it as soon as it is done
        routed: dict[str, int] = {}
        fallback: list[str] = []
        with self.clock("statistics + solve (GPTQ/RTN, FP target)"):
            quantized = self._calibrate_layer(ctx, stats_in, (_fp_copy(layer), x_fp) if self._wants_fp_inputs() else None, routed, fallback)
        with self.clock("quantized stream"):
            q_out = self._advance(i, layer, x_q, kwargs, between)
        num, den = squared_error_sums(q_out, fp_out)
        num, den = D.all_reduce_scalars_sum([num, den])  # no-op in a single process
        peak = torch.tensor([peak_memory_mb(self.device)], dtype=torch.float64)
        D.all_reduce_max_(peak)
        report = LayerReport(
            index=i,
            rel_error=num / max(den, 1e-30),
            seconds=time.perf_counter() - start,
            peak_mem_mb=float(peak[0]),
            num_linears=len(quantized),
            search_alphas=alphas,
            routed_tokens=routed,
            rtn_fallback=fallback,
        )
        return fp_out, q_out, quantized, report

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
        return LayerContext(index, layer, own, self.config, self.adapter, self.device, self.scale_dtype, self.sample_ids, self.token_weights, self._store)

    def _dev(self, x: Any) -> Any:
        return tree_to(x, self.device)

    @torch.no_grad()
    def _advance(self, index: int, layer: nn.Module, xs: Any, kwargs: list[dict[str, Any]], between: list[dict[str, Any]]) -> Any:
        """A stream one layer on: the next layer's inputs (the adapter's step: the layer, then whatever the
        model does before the next one). The streams are what the next layer sees, so they take the step."""
        return self._store([self.adapter.layer_step(index, layer, self._dev(x), self._dev(kw), b).to("cpu") for x, kw, b in zip(xs, kwargs, between)])

    def _wants_fp_inputs(self) -> bool:
        return self.config.solver == "gptq" and self.config.gptq.target == "fp"

    def _calibrate_layer(self, ctx: LayerContext, xs: list[Tensor], fp_ref: tuple[nn.Module, Any] | None = None, routed: dict[str, int] | None = None, fallback: list[str] | None = None) -> dict[str, QuantizedWeight]:
        """Solve the layer's linears group by group; ``routed``/``fallback`` receive the routed linears'
        token counts and the names solved by RTN for lack of rows (see :meth:`_calibrator`)."""
        layer, kwargs, prefix = ctx.layer, ctx.kwargs, ctx.prefix
        scheme = self.config.scheme
        out: dict[str, QuantizedWeight] = {}
        groups = linear_groups(layer, self._dev(xs[0]), self._dev(kwargs[0]), lambda n: self.adapter.keeps_16bit(f"{prefix}.{n}")) if len(xs) else None
        if self.ctx.enabled:  # a rank with no samples cannot discover them; rank 0 always has samples
            groups = D.broadcast_object(groups)
        for group in groups:
            mods = {n: layer.get_submodule(n) for n in group}
            if scheme.activations is not None:
                # The group's own inputs are quantized at inference too: calibrate on what it will see.
                self.act_hooks += [add_input_quantizer(m, scheme.activations) for m in mods.values()]
            cals = {n: self._calibrator(m) for n, m in mods.items()}
            if any(c.needs_inputs for c in cals.values()):
                self._observe(ctx, mods, cals, xs, fp_ref)
                for cal in cals.values():
                    cal.reduce(self.ctx)
            if group is groups[-1]:
                fp_ref = None  # the FP copy (one layer) is done with: free it before the last, widest solve
            for n, m in mods.items():
                if isinstance(m, RoutedLinear) and cals[n].needs_inputs:
                    seen = cals[n].num_tokens
                    if routed is not None:
                        routed[n] = seen
                    if seen < self.config.gptq.min_tokens:
                        cals[n] = make_calibrator("rtn", m.weight, scheme, self.config.gptq, self.scale_dtype, self.device)
                        if fallback is not None:
                            fallback.append(n)
                qw = cals[n].solve(m.weight.data)
                m.weight.data.copy_(qw.dequantize(m.weight.dtype))
                out[f"{prefix}.{n}"] = _to_cpu(qw)
        return out

    def _calibrator(self, module: nn.Module) -> LinearCalibrator:
        """The solver of one linear. A routed linear (one MoE expert's) gets the plain target: the FP
        copy routes the FP inputs by its own router, so its expert sees other tokens than this one, and
        ``W X_fp`` has no row-by-row pairing with ``W X_q`` there."""
        gptq = self.config.gptq
        if isinstance(module, RoutedLinear) and gptq.target == "fp":
            gptq = dc_replace(gptq, target="quantized")
        return make_calibrator(self.config.solver, module.weight, self.config.scheme, gptq, self.scale_dtype, self.device)

    @torch.no_grad()
    def _observe(self, ctx: LayerContext, mods: dict[str, nn.Module], cals: dict[str, LinearCalibrator], xs: list[Tensor], fp_ref: tuple[nn.Module, Any] | None = None) -> None:
        """Feed every linear of ``mods`` its inputs (after activation fake-quantization, which the
        forward hook sees), token weights and, for an FP target, the FP copy's inputs of the same tokens."""
        current: dict[str, Tensor | None] = {}
        fp_inputs: dict[str, Tensor] = {}
        wants_fp = fp_ref is not None and any(c.needs_fp_inputs for c in cals.values())

        def make_hook(name: str) -> Callable:
            def hook(m: nn.Module, args: tuple, _out: Tensor) -> None:
                cals[name].observe(args[0], rows_of(m, current[name], args[0]), x_fp=fp_inputs.pop(name, None))

            return hook

        def make_fp_hook(name: str) -> Callable:
            def hook(_m: nn.Module, args: tuple, _out: Tensor) -> None:
                fp_inputs[name] = args[0]

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
        if wants_fp:
            handles += [fp_ref[0].get_submodule(n).register_forward_hook(make_fp_hook(n)) for n in mods if cals[n].needs_fp_inputs]
        try:
            for s, (x, kw) in enumerate(zip(xs, ctx.kwargs)):
                for name, mod in mods.items():  # per-linear importance gives each linear its own token weights
                    w = ctx.weights(s, None if isinstance(mod, RoutedLinear) else name)
                    current[name] = None if w is None else w.to(self.device).reshape(1, -1)
                if wants_fp:
                    run_layer(fp_ref[0], self._dev(fp_ref[1][s]), self._dev(kw))
                run_layer(ctx.layer, self._dev(x), self._dev(kw))
        finally:
            for h in handles:
                h.remove()

    def remove_activation_quantizers(self) -> None:
        for h in self.act_hooks:
            h.remove()
        self.act_hooks.clear()


def _fp_copy(layer: nn.Module) -> nn.Module:
    """A hook-free copy of ``layer`` as it is now (FP weights): the reference the FP target reads."""
    ref = copy.deepcopy(layer)
    for m in ref.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    return ref


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero_point.cpu(), qw.spec)


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
