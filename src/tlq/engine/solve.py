"""The solve step: each linear group's statistics on the layer's inputs, then its weights solved (GPTQ or
RTN; GPTQ aimed at the FP model's outputs when ``gptq.target == "fp"``).

Inside a layer the linears are solved in execution order, group by group (linears that read the same
tensor, e.g. q/k/v, form one group; :func:`linear_groups`), so a later group sees
the error of the earlier ones ("true sequential"). For W-A schemes each group's input quantizers go on
before its statistics are taken: the group is calibrated on what it will see at inference. MoE experts
(:class:`tlq.models.moe.RoutedLinear`) see only their routed rows, and fall back to RTN below
``gptq.min_tokens`` of them (``gptq.min_tokens_in`` for the linears reading the block's input; reported per layer).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tlq.engine import distributed as D
from tlq.engine.context import LayerContext, LayerState
from tlq.engine.rows import kept_rows, layer_row_cuts, weights_of_rows
from tlq.models.base import hook_free_copy, run_layer
from tlq.models.moe import RoutedLinear, rows_of
from tlq.quant.quantizer import QuantizedWeight, add_input_quantizer
from tlq.quant.solvers import LinearCalibrator, make_calibrator


def solve_step(ctx: LayerContext, state: LayerState) -> None:
    """Solve every linear of the layer (fills ``state.quantized``, ``routed_tokens``, ``rtn_fallback``).

    The FP target reads every linear's FP inputs from an FP copy of the layer taken now, after the
    (function-preserving) scale folding, so that its inputs are in the same scaled coordinates as the
    quantized layer's; the copy is freed before the last, widest group is solved.
    """
    fp_ref = (hook_free_copy(ctx.layer), state.x_fp) if ctx.config.fp_target else None
    xs = state.inputs(ctx.config)
    groups = _bounded(ctx, _groups(ctx, xs))
    for group in groups:
        mods = {n: ctx.layer.get_submodule(n) for n in group}
        if ctx.config.scheme.activations is not None:
            ctx.act_hooks.extend(add_input_quantizer(m, ctx.config.scheme.activations) for m in mods.values())
        cals = {n: _calibrator(ctx, m) for n, m in mods.items()}
        if any(c.needs_inputs for c in cals.values()):
            _observe(ctx, mods, cals, xs, fp_ref)
            for cal in cals.values():
                cal.reduce(ctx.dist)
        if group is groups[-1]:
            fp_ref = None  # the FP copy (one layer) is done with
        for n, m in mods.items():
            _solve_one(ctx, state, n, m, cals)
        del cals  # before the next group's statistics are allocated, not after


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


def _bounded(ctx: LayerContext, groups: list[list[str]]) -> list[list[str]]:
    """``groups`` with every MoE stage cut into chunks of experts whose GPTQ Hessians (``in x in`` float64
    each) fit ``gptq.stats_memory_gib``. Exact: an expert's gate/up read the block's routed input rows and
    its down its own gate/up's output, so no expert's statistics depend on another expert being solved
    first. Deterministic from the shapes, so every rank cuts alike."""
    if ctx.config.solver != "gptq":
        return groups
    budget = ctx.config.gptq.stats_memory_gib * 2**30
    out: list[list[str]] = []
    for group in groups:
        mods = [ctx.layer.get_submodule(n) for n in group]
        if not all(isinstance(m, RoutedLinear) for m in mods):
            out.append(group)
            continue
        chunk: list[str] = []
        used = 0.0
        for name, mod in zip(group, mods):
            need = mod.in_features**2 * 8
            if chunk and used + need > budget:
                out.append(chunk)
                chunk, used = [], 0.0
            chunk.append(name)
            used += need
        out.append(chunk)
    return out


def _groups(ctx: LayerContext, xs: Any) -> list[list[str]]:
    """The layer's linear groups in execution order (discovered by rank 0 and shared: a rank with no
    samples cannot run the layer)."""
    groups = linear_groups(ctx.layer, ctx.dev(xs[0]), ctx.dev(ctx.kwargs[0]), lambda n: ctx.adapter.keeps_16bit(f"{ctx.prefix}.{n}")) if len(xs) else None
    return D.broadcast_object(groups) if ctx.dist.enabled else groups


def _solve_one(ctx: LayerContext, state: LayerState, name: str, module: nn.Module, cals: dict[str, LinearCalibrator]) -> None:
    """Solve one linear; a routed linear with too few rows is solved by RTN (and reported)."""
    cal = cals[name]
    if isinstance(module, RoutedLinear) and cal.needs_inputs:
        state.routed_tokens[name] = cal.num_tokens
        gptq = ctx.config.gptq
        if cal.num_tokens < (gptq.min_tokens_in if module.reads_block_input else gptq.min_tokens):
            # replaced in ``cals`` too, so that the unused Hessian is freed now
            cal = cals[name] = make_calibrator("rtn", module.weight, ctx.config.scheme, gptq, ctx.scale_dtype, ctx.device)
            state.rtn_fallback.append(name)
    qw = cal.solve(module.weight.data)
    module.weight.data.copy_(qw.dequantize(module.weight.dtype))
    state.quantized[f"{ctx.prefix}.{name}"] = QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero_point.cpu(), qw.spec)


def _calibrator(ctx: LayerContext, module: nn.Module) -> LinearCalibrator:
    """The solver of one linear. A routed linear (one MoE expert's) gets the plain target: the FP
    copy routes the FP inputs by its own router, so its expert sees other tokens than this one, and
    ``W X_fp`` has no row-by-row pairing with ``W X_q`` there."""
    gptq = ctx.config.gptq
    if isinstance(module, RoutedLinear) and gptq.target == "fp":
        gptq = replace(gptq, target="quantized")
    return make_calibrator(ctx.config.solver, module.weight, ctx.config.scheme, gptq, ctx.scale_dtype, ctx.device)


@torch.no_grad()
def _observe(ctx: LayerContext, mods: dict[str, nn.Module], cals: dict[str, LinearCalibrator], xs: Any, fp_ref: tuple[nn.Module, Any] | None) -> None:
    """Feed every linear of ``mods`` its inputs (after activation fake-quantization, which the
    forward hook sees), token weights and, for an FP target, the FP copy's inputs of the same tokens.

    With ``selection.kept_rows_passes`` (the token-level calibration set leaves most rows weightless) both
    forwards run with the row cuts of :mod:`tlq.engine.rows` (the scale search's): queries, the MLP and
    ``o_proj`` at the rows some linear of the group keeps only. The statistics are those of the uncut
    forward up to float rounding.
    """
    current: dict[str, Tensor | None] = {}
    fp_inputs: dict[str, Tensor] = {}
    rows: list[Tensor | None] = [None]  # this sample's kept rows, read by the cuts and the hooks
    wants_fp = fp_ref is not None and any(c.needs_fp_inputs for c in cals.values())

    def make_hook(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, _out: Tensor) -> None:
            w = weights_of_rows(current[name], args[0], rows[0])
            cals[name].observe(args[0], rows_of(m, w, args[0]), x_fp=fp_inputs.pop(name, None))

        return hook

    def make_fp_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, _out: Tensor) -> None:
            fp_inputs[name] = args[0]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
    fp_names = [n for n in mods if cals[n].needs_fp_inputs] if wants_fp else []
    fp_mods = [fp_ref[0].get_submodule(n) for n in fp_names]
    handles += [m.register_forward_hook(make_fp_hook(n)) for n, m in zip(fp_names, fp_mods)]
    # when asked (SelectionConfig.kept_rows_passes), with token weights, and not for routed linears (their
    # rows index the uncut block input)
    cut = ctx.config.selection.kept_rows_passes and ctx.token_weights is not None and not any(isinstance(m, RoutedLinear) for m in mods.values())
    cuts = (layer_row_cuts(ctx.layer, ctx.adapter, rows) + (layer_row_cuts(fp_ref[0], ctx.adapter, rows) if fp_mods else [])) if cut else []
    # registered after the observers, so a stop fires only once the group's last linear has been observed
    stops = [_PartialForward(list(mods.values()))] + ([_PartialForward(fp_mods)] if fp_mods else [])
    try:
        for s, (x, kw) in enumerate(zip(xs, ctx.kwargs)):
            for name, mod in mods.items():  # per-linear importance gives each linear its own token weights
                routed = isinstance(mod, RoutedLinear)  # an expert: the layer's weights, over every routed row if asked
                w = ctx.weights(s, None if routed else name, every_token=routed and ctx.config.selection.experts_every_row)
                current[name] = None if w is None else w.to(ctx.device).reshape(1, -1)
            rows[0] = _union_of_kept_rows(list(current.values())) if cuts else None
            if fp_mods:
                stops[1].run(fp_ref[0], ctx.dev(fp_ref[1][s]), ctx.dev(kw))
            stops[0].run(ctx.layer, ctx.dev(x), ctx.dev(kw))
    finally:
        for h in handles:
            h.remove()
        for stop in stops + cuts:
            stop.remove()


def _union_of_kept_rows(weights: list[Tensor | None]) -> Tensor | None:
    """The rows at least one linear of the group keeps (``None``: all rows, as when one has no weights)."""
    if not weights or any(w is None for w in weights):
        return None
    return kept_rows(torch.stack([w.reshape(-1) for w in weights]).amax(0))


class _Observed(Exception):
    """Raised inside a layer's forward once the observed linears have all seen their input."""


class _PartialForward:
    """Runs a layer only as far as a group of its linears: the forward stops once each has been called.

    Why: a group's statistics need its linears' inputs, not the rest of the layer; the q/k/v group needs
    no more than the input norm, and only the last group (``down_proj``) needs most of the MLP (measured:
    the passes take 0.66-0.70x the time at Qwen2-VL-2B widths, docs/cost.md). Exact only where each linear runs once
    per forward, so the first call runs the whole layer and counts the calls; stopping starts from the
    next call when every linear ran exactly once (never for MoE experts, which a sample may not reach).
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.calls = [0] * len(modules)
        self.stop = False  # decided after the first, whole forward
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Callable:
        def hook(*_args: Any) -> None:
            self.calls[i] += 1
            if self.stop and all(c > 0 for c in self.calls):
                raise _Observed

        return hook

    def run(self, layer: nn.Module, x: Any, kwargs: dict[str, Any]) -> None:
        first = not self.stop
        self.calls = [0] * len(self.modules)
        try:
            run_layer(layer, x, kwargs)
        except _Observed:
            return
        if first:
            self.stop = bool(self.modules) and not any(isinstance(m, RoutedLinear) for m in self.modules) and all(c == 1 for c in self.calls)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
