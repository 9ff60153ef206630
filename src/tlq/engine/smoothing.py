"""The scale-search step (AWQ / SmoothQuant / MBQ / TLQ): per-channel scales migrated between each
producer and the linears that read it, chosen by a quantized loss, before the layer is solved.

For each of the adapter's mappings of a layer (:meth:`ModelAdapter.smooth_mappings`), the step records
the mapping's channel statistics and the FP calls of the module a candidate is judged on (the decoder
layer, or a block that is enough: :func:`loss_module`; with ``ScaleSearchConfig.record="layer"`` one FP
pass of the layer records every mapping before the first fold), tries the exponent grid with the linears
fake-quantized (weights and, for W-A schemes, activations), and folds the best scales
(:mod:`tlq.quant.scale_search` holds the tensor algorithms; this module runs them on a layer).
Token weights make the loss TLQ's (per token) or MBQ's (per modality); with the token-level calibration
set, row-wise blocks are judged on the rows of the tokens inside the budget only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from tlq.config import QuantizeConfig
from tlq.engine import distributed as D
from tlq.engine.activations import Prefix, release_store
from tlq.engine.context import LayerContext, LayerState
from tlq.engine.rows import kept_rows, layer_row_blocks, layer_row_cuts, row_cuts, weights_of_rows
from tlq.models.base import SmoothMapping, main_output, run_layer, tree_to
from tlq.models.moe import RoutedLinear, expert_of, rows_of, running_modules
from tlq.quant.quantizer import add_input_quantizer
from tlq.quant.rtn import rtn_fake_quantize
from tlq.quant.scale_search import ChannelStats, ChannelStatsAccumulator, alpha_grid, can_fold, candidate_scales, fold_scales, search_scales
from tlq.utils.precision import resolve_matmul_dtype


def scale_search_step(ctx: LayerContext, state: LayerState) -> None:
    """The step: scales searched on the layer's statistics inputs and folded (``state.search_alphas``)."""
    state.search_alphas = search_layer_scales(ctx, state.inputs(ctx.config))


def search_layer_scales(ctx: LayerContext, xs: Any) -> dict[str, float]:
    """Migrate per-channel scales for each producer->linears mapping of the adapter, in order.

    The loss of a candidate is the token-weighted error, with the mapping's linears fake-quantized
    (weights and, for W-A schemes, activations), against the FP layer on the same inputs: of the
    layer output (scope "layer"; it isolates this layer's own quantization error) or of the
    mapping's block (scope "block", AWQ's loss). A block whose output is added unchanged to the
    layer output has the layer's error, so the layer scope measures such mappings on the block
    alone (:func:`loss_module`): the same number for a fraction of the work. ``xs`` are the inputs the
    statistics come from (the quantized stream, or the FP one for the FP-input ablation).
    """
    search = ctx.config.search
    layer, kwargs = ctx.layer, ctx.kwargs
    if search.kind == "none":
        return {}
    # the globally first max_samples samples, wherever they live: this rank's share is a prefix
    n = sum(1 for sid in ctx.sample_ids if sid < search.max_samples)
    xs, kwargs = Prefix(xs, n), kwargs[:n]
    weights = [ctx.weights(s) for s in range(n)]
    layer_targets = None  # the FP layer's outputs, computed once if a mapping needs them
    alphas = [search.fixed_alpha] if search.fixed_alpha is not None else alpha_grid(search.grid)
    plans = _plans(ctx)
    # recorded ahead, in one FP pass of the layer before any fold (search.record == "layer"): every mapping
    # but those judged with one routed expert alone, whose block output differs per expert
    ahead = [p for p in plans if p.alone is contextlib.nullcontext] if search.record == "layer" else []
    recorded: dict[int, tuple[ChannelStats | None, BlockCalls | None, list[Tensor | None]]] = {}
    if ahead:
        outputs: list[Tensor] | None = [] if any(not p.recording.block for p in ahead) else None
        for p, got in zip(ahead, _record_mappings(ctx, [p.recording for p in ahead], xs, kwargs, weights, outputs)):
            recorded[id(p)] = got
        layer_targets = ctx.store(outputs) if outputs is not None else None
    chosen: dict[str, float] = {}
    for plan in plans:
        mapping, prev, linears, passive, alone = plan.mapping, plan.prev, plan.linears, plan.passive, plan.alone
        if id(plan) in recorded:
            stats, calls, call_weights = recorded.pop(id(plan))
        else:
            # judged on the layer: the statistics pass is the FP layer's forward, so it yields the targets too
            outputs = [] if not plan.recording.block and layer_targets is None else None
            with alone():
                (stats, calls, call_weights), = _record_mappings(ctx, [plan.recording], xs, kwargs, weights, outputs)
            if outputs is not None and stats is not None:  # (else: computed by the next mapping that needs them, as before)
                layer_targets = ctx.store(outputs)
        if stats is None:  # no token reached the linears (an expert no search sample was routed to)
            chosen[mapping.prev] = math.nan
            if calls is not None:
                calls.release()
            continue
        if calls is None:
            calls = BlockCalls.of_layer(layer, xs, kwargs, layer_targets)

        whole = calls.module is layer  # a candidate judged on the whole layer: cut to the weighted rows inside it

        def loss_fn(linears: list[nn.Linear] = linears, calls: BlockCalls = calls, w: list[Tensor | None] = call_weights, whole: bool = whole,
                    alone: Callable[[], Any] = alone) -> float:
            with alone():
                return _quantized_loss(ctx, linears, calls, w, whole)

        if search.fixed_alpha is not None:  # plain SmoothQuant: no search, always migrate
            fold_scales(prev, linears + passive, candidate_scales(search.kind, search.fixed_alpha, stats, linears), mapping.prev_offset)
            chosen[mapping.prev] = search.fixed_alpha
        else:
            chosen[mapping.prev] = search_scales(search.kind, prev, linears, stats, alphas, loss_fn, passive, mapping.prev_offset, search.coarse).alpha
        calls.release()
    release_store(layer_targets)
    return chosen


def _one_expert(layer: nn.Module, linears: list[nn.Module], block: str) -> Callable[[], Any]:
    """A context factory: while a mapping inside one routed expert is recorded and judged on a block (the
    MoE block), that expert alone runs in it (:meth:`UnfusedExperts.alone`): the same loss, both target
    and candidates leaving out the other experts' unchanged contributions. Whole-layer judging keeps every
    expert (the error passes on through the layer's nonlinear rest, where the others' outputs matter)."""
    found = expert_of(layer.get_submodule(block), linears) if block else None
    if found is None:
        return contextlib.nullcontext
    experts, index = found
    return lambda: experts.alone(index)


def loss_module(config: QuantizeConfig, mapping: SmoothMapping) -> str:
    """The module (name within the layer; "" = the layer) whose output error a candidate is judged by."""
    if config.search.scope == "block" or mapping.block_ends_layer:
        return mapping.block
    return ""


@dataclass(frozen=True)
class Recording:
    """What the FP pass records for one mapping: the channel statistics of ``first``'s input and, for a
    ``block`` other than the whole layer (""), that block's calls; ``rowwise``: only the rows of tokens
    with a non-zero weight (see :func:`_record_mappings`)."""

    first: nn.Module
    block: str
    rowwise: bool


@dataclass(frozen=True)
class MappingPlan:
    """One mapping of a layer that can fold, with its modules looked up once."""

    mapping: SmoothMapping
    prev: nn.Module
    linears: list[nn.Module]
    passive: list[nn.Module]
    alone: Callable[[], Any]  # the context its passes run in (:func:`_one_expert`)
    recording: Recording


def _plans(ctx: LayerContext) -> list[MappingPlan]:
    """The adapter's mappings of ``ctx.layer`` whose scales can fold, in order."""
    layer, plans = ctx.layer, []
    for mapping in ctx.adapter.smooth_mappings(layer):
        prev = layer.get_submodule(mapping.prev)
        linears = [layer.get_submodule(name) for name in mapping.linears]
        passive = [layer.get_submodule(name) for name in mapping.passive]
        if not can_fold(prev, linears + passive):
            continue
        block = loss_module(ctx.config, mapping)
        first = layer.get_submodule(mapping.stats_from) if mapping.stats_from else linears[0]
        plans.append(MappingPlan(mapping, prev, linears, passive, _one_expert(layer, linears, block),
                                 Recording(first, block, bool(block) and mapping.rowwise)))
    return plans


@torch.no_grad()
def _record_mappings(ctx: LayerContext, recordings: Sequence[Recording], xs: Any, kwargs: list[dict[str, Any]], weights: list[Tensor | None],
                     layer_outputs: list[Tensor] | None = None) -> list[tuple[ChannelStats | None, BlockCalls | None, list[Tensor | None]]]:
    """One FP pass of the layer that records each of ``recordings``: the channel statistics of its
    mapping's input and, for a block other than the whole layer, the block's inputs and outputs
    (``None`` for the layer itself), with the token weights that go with them. A ``rowwise`` block keeps
    only the rows of tokens with a non-zero weight (and their weights): a zero-weight row adds nothing to
    a candidate's loss, so evaluating candidates on the kept rows gives the same loss for a fraction of
    the work. ``layer_outputs``: if a list, the layer's own outputs (on the CPU, without what the model
    adds between layers) are appended to it: the targets of candidates judged on the whole layer,
    without a second FP pass.

    With ``selection.kept_rows_passes`` the pass runs the kept rows only (the row cuts of
    :mod:`tlq.engine.rows`: the MLP, ``o_proj`` and attention queries): every recorded quantity is read
    at positive-weight rows only (statistics, kept block rows, targets under a weighted loss), so the
    rows not computed were never used. Not in a layer with routed experts, whose rows index the whole
    block input."""
    current: dict[str, Any] = {"w": None, "rows": None}
    recorders = [_Recorder(ctx, r, current) for r in recordings]
    handles = [h for r in recorders for h in r.install()]
    cell: list[Tensor | None] = [None]
    # the option first: the module walk that finds routed experts runs only where it is on
    wanted = ctx.config.selection.kept_rows_passes and any(w is not None for w in weights)
    wanted = wanted and not any(isinstance(m, RoutedLinear) for m in ctx.layer.modules())
    cuts = layer_row_cuts(ctx.layer, ctx.adapter, cell) if wanted else []
    try:
        for x, kw, w in zip(xs, kwargs, weights):
            kept = kept_rows(w) if cuts else None
            current["w"], current["rows"] = w, kept
            cell[0] = None if kept is None else kept.to(ctx.device)
            out = run_layer(ctx.layer, ctx.dev(x), ctx.dev(kw))
            if layer_outputs is not None:
                layer_outputs.append(out.to("cpu"))
    finally:
        for h in handles + cuts:
            h.remove()
    return [r.result(weights) for r in recorders]


class _Recorder:
    """The hooks of one :class:`Recording` during a pass, and what they gathered."""

    def __init__(self, ctx: LayerContext, recording: Recording, current: dict[str, Tensor | None]) -> None:
        self.ctx, self.recording, self.current = ctx, recording, current
        self.acc = ChannelStatsAccumulator(recording.first.weight.shape[-1])
        self.mains: list[Tensor] = []
        self.rests: list[tuple[tuple, dict[str, Any]]] = []
        self.outputs: list[Tensor] = []
        self.kept: list[Tensor | None] = []
        self.keyword: str | None = None

    def install(self) -> list[Any]:
        r = self.recording
        handles = [r.first.register_forward_hook(lambda m, args, _o: self.acc.add(args[0], rows_of(m, self._weights(args[0]))))]
        if r.block:
            handles.append(self.ctx.layer.get_submodule(r.block).register_forward_hook(self._record, with_kwargs=True))
        return handles

    def _record(self, _m: nn.Module, args: tuple, kw: dict[str, Any], out: Any) -> None:
        if args:
            main, rest = args[0], (args[1:], kw)
        else:  # called by keyword, as transformers calls its attention modules
            self.keyword = "hidden_states"
            rest_kw = dict(kw)
            main, rest = rest_kw.pop("hidden_states"), ((), rest_kw)
        out, w = main_output(out), self._weights(main)
        if self.recording.rowwise and w is not None:
            rows = (w > 0).nonzero().reshape(-1).to(main.device)
            main, out, w = main[:, rows], out[:, rows], w[rows.to(w.device)]
        self.mains.append(main.detach().to("cpu"))
        self.rests.append(tree_to(rest, "cpu"))
        self.outputs.append(out.detach().to("cpu"))
        self.kept.append(w)

    def _weights(self, x: Tensor) -> Tensor | None:
        """The sample's token weights of the rows ``x`` holds (the kept ones inside a cut block)."""
        return weights_of_rows(self.current["w"], x, self.current["rows"])

    def result(self, weights: list[Tensor | None]) -> tuple[ChannelStats | None, BlockCalls | None, list[Tensor | None]]:
        D.reduce_channel_stats_(self.acc)
        stats = self.acc.result() if self.acc.total > 0 else None  # reduced: every rank agrees
        if not self.recording.block:
            return stats, None, weights
        block = self.ctx.layer.get_submodule(self.recording.block)
        return stats, BlockCalls(block, self.ctx.store(self.mains), self.rests, self.keyword, self.ctx.store(self.outputs)), self.kept


@torch.no_grad()
def _quantized_loss(ctx: LayerContext, linears: list[nn.Linear], calls: BlockCalls, weights: list[Tensor | None], whole: bool = False) -> float:
    """The token-weighted squared error of the block's output with ``linears`` fake-quantized. ``whole``
    (the block is the layer): the layer's row-wise blocks and attention queries compute only the rows of
    tokens with a positive weight (the others weigh nothing in the loss): the same loss for less work."""
    scheme = ctx.config.scheme
    # the fake-quantized weights are swapped in and the originals back (no copy of either)
    originals = [lin.weight.data for lin in linears]
    hooks = []
    rows: list[Tensor | None] = [None]
    try:
        for lin in linears:
            lin.weight.data = rtn_fake_quantize(lin.weight, scheme.weights, scale_dtype=ctx.scale_dtype)
            if scheme.activations is not None:
                hooks.append(add_input_quantizer(lin, scheme.activations))
        row_blocks = layer_row_blocks(ctx.layer, ctx.adapter)
        if whole:
            hooks += row_cuts(ctx.layer, row_blocks, ctx.adapter.spec.attention, rows)
        # summed where the outputs are (float64, as Python floats would be) and read once per candidate:
        # on a GPU a read per sample is a host round trip per sample and candidate
        total = None
        with loss_precision(calls.module, ctx.config.search.loss_dtype, blocks=row_blocks):
            for i, w in enumerate(weights):
                kept = kept_rows(w)
                rows[0] = None if kept is None else kept.to(ctx.device)
                out = calls.run(i, ctx.dev).float()
                err = (out - calls.targets[i].to(out.device).float()).pow(2).sum(-1)[0]
                part = ((err * w.to(err.device)).sum() if w is not None else err.sum()).double()
                total = part if total is None else total + part
        return D.all_reduce_scalar_sum(0.0 if total is None else float(total))
    finally:
        for h in hooks:
            h.remove()
        for lin, w0 in zip(linears, originals):
            lin.weight.data = w0


# Linears below this many weights keep float32 in a bf16 loss: on a CPU with AVX512-BF16 a bf16 matmul (casts
# included) took 0.33-0.60x the float32 time from 262,144 weights up at 32 to 600 rows, but 0.58-1.17x at
# 65,536 and up to 2.7x at 16,384 (docs/bf16_matmul.md).
BF16_MIN_WEIGHTS = 1 << 18


@contextlib.contextmanager
def loss_precision(module: nn.Module, loss_dtype: str, min_weights: int | None = None, blocks: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Run the matmuls of ``module``'s float32 linears (those of at least ``min_weights`` weights) in
    ``loss_dtype`` while a candidate is judged: weights cast once per candidate, each input cast on the
    way in (after the activation quantizer and the candidate's input division, which run first) and each
    output cast back to float32, so norms, attention, residual sums and the loss stay float32 and only
    the matmuls' operands are rounded. ``"compute"``: unchanged; ``"auto"``: :func:`tlq.utils.precision.resolve_matmul_dtype`.
    ``min_weights``: default :data:`BF16_MIN_WEIGHTS`.

    ``blocks``: row-wise blocks (the MLP) inside ``module``; one whose parameters all belong to cast
    linears runs in ``loss_dtype`` throughout (its linears' outputs and what runs between them, the
    MLP's activation and gate product) and only its output comes back as float32. Why: the next linear
    rounds its input to bf16 anyway, so the float32 round trip of the block's widest activations
    (``rows x intermediate``) bought nothing: without it the search took 0.93-0.98x the time at
    LLaVA-OneVision-0.5B widths (docs/cost.md, run 10)."""
    min_weights = BF16_MIN_WEIGHTS if min_weights is None else min_weights
    # only what can run (an expert judged alone leaves the others idle: nothing to cast or hook there)
    linears = [m for m in running_modules(module) if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and m.weight.numel() >= min_weights]
    loss_dtype = resolve_matmul_dtype(loss_dtype, linears[0].weight.device) if linears else "compute"
    if loss_dtype == "compute":
        yield
        return
    dtype = getattr(torch, loss_dtype)
    low = _low_precision_blocks(module, blocks, linears)
    inside = {id(m) for b in low for m in b.modules()}
    saved = [(lin.weight.data, None if lin.bias is None else lin.bias.data) for lin in linears]
    handles = []
    try:
        for lin in linears:
            lin.weight.data = lin.weight.data.to(dtype)
            if lin.bias is not None:
                lin.bias.data = lin.bias.data.to(dtype)
            handles.append(lin.register_forward_pre_hook(lambda _m, args, dt=dtype: (args[0].to(dt), *args[1:])))
            if id(lin) not in inside:
                handles.append(lin.register_forward_hook(lambda _m, _args, out: out.float()))
        for block in low:
            handles.append(block.register_forward_hook(lambda _m, _args, out: _as_float(out)))
        yield
    finally:
        for h in handles:
            h.remove()
        for lin, (w, b) in zip(linears, saved):
            lin.weight.data = w
            if b is not None:
                lin.bias.data = b


def _low_precision_blocks(module: nn.Module, blocks: Sequence[nn.Module], linears: list[nn.Linear]) -> list[nn.Module]:
    """The ``blocks`` inside ``module`` whose every parameter is a weight or bias of one of ``linears``
    (a MoE block, with its router and fused experts, or a block holding a small linear is not one)."""
    cast = {id(lin) for lin in linears}
    within = {id(m) for m in module.modules()}
    return [b for b in blocks if id(b) in within and any(id(m) in cast for m in b.modules())
            and all(id(m) in cast for m in b.modules() if next(m.parameters(recurse=False), None) is not None)]


def _as_float(out: Any) -> Any:
    """A block's output with its low-precision floating tensors cast to float32 (a tensor or a tuple)."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_as_float(o) for o in out)
    return out


class BlockCalls:
    """Recorded FP calls of one module, per sample: replaying them under changed weights gives the
    module's output on the same inputs, which is what a scale candidate is compared on.

    The main input (the activation, which can be large) lives in an activation store like the
    engine's own, so ``--max-cpu-memory`` bounds it; the other arguments (position embeddings, masks)
    are kept as they came. ``keyword`` names the main input when the module was called with it by name.
    """

    def __init__(self, module: nn.Module, mains: Any, rests: list[tuple[tuple, dict[str, Any]]], keyword: str | None, targets: Any, owned: bool = True) -> None:
        self.module, self.mains, self.rests, self.keyword, self.targets = module, mains, rests, keyword, targets
        self.owned = owned  # whether the stores are this object's to release

    @classmethod
    def of_layer(cls, layer: nn.Module, xs: Any, kwargs: list[dict[str, Any]], targets: Any) -> "BlockCalls":
        """The decoder layer itself, on the engine's stored inputs and FP outputs (nothing copied)."""
        return cls(layer, xs, [((), kw) for kw in kwargs], None, targets, owned=False)

    def run(self, i: int, to_device: Callable[[Any], Any]) -> Tensor:
        main = to_device(self.mains[i])
        args, kw = to_device(self.rests[i])
        out = self.module(*args, **{**kw, self.keyword: main}) if self.keyword else self.module(main, *args, **kw)
        return main_output(out)

    def release(self) -> None:
        if self.owned:
            release_store(self.mains)
            release_store(self.targets)
