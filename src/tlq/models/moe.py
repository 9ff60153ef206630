"""Mixture-of-experts blocks as per-expert linears: the calibration view of fused experts.

transformers 5 stores a MoE block's routed experts *fused*: ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` parameters of one module, not ``nn.Linear`` s. Everything in TLQ that calibrates
a weight (the layer walk's linear groups, GPTQ's Hessians, activation quantizers, the scale search,
export) works on ``nn.Linear`` s found by hooks. So an adapter of a MoE family replaces each fused
experts module by :class:`UnfusedExperts`: a ``ModuleList`` of per-expert ``gate_proj`` / ``up_proj`` /
``down_proj`` linears (the names llm-compressor's exports and vLLM's per-expert loaders use), whose
forward is the fused forward's loop, expert by expert, with the same arithmetic.

Routed tokens. An expert's linears see only the tokens routed to them, as rows of the block's flattened
input. :class:`RoutedLinear` remembers which rows those were during the current call (``rows``), so
per-token statistics (GPTQ's Hessian, channel statistics, token weights) pair each input row with its
own token: :func:`rows_of` maps a ``[.., seq]`` token-weight vector to the rows a linear received. A
rarely routed expert therefore gets a Hessian from few rows; the engine's rule for that case is in
``GPTQConfig.min_tokens`` (``min_tokens_in`` for gate/up).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from tlq.models.base import SmoothMapping


class RoutedLinear(nn.Linear):
    """An ``nn.Linear`` that sees a routed subset of the block's tokens.

    ``rows`` holds, during a forward call of its expert, the indices of the block-input rows (flattened
    ``batch * seq`` tokens) it was called on; ``None`` outside a call or when it saw every token.
    """

    rows: Tensor | None = None
    #: it reads the MoE block's input (an expert's gate/up), not the expert's own intermediate (its down):
    #: the two need different row counts for GPTQ to beat RTN (``GPTQConfig.min_tokens_in`` / ``min_tokens``)
    reads_block_input: bool = False


def rows_of(module: nn.Module, weights: Tensor | None, x: Tensor | None = None) -> Tensor | None:
    """The token weights of the rows ``module`` received in its current call: ``weights`` (``[..., seq]``)
    flattened and gathered at the module's routed rows; for a module that sees every token, ``weights``
    in the layout of its input ``x`` (a MoE block's shared expert reads the tokens flattened)."""
    rows = getattr(module, "rows", None)
    if weights is None:
        return None
    if rows is not None:
        return weights.reshape(-1)[rows.to(weights.device)]
    if x is not None and tuple(weights.shape) != tuple(x.shape[:-1]) and weights.numel() == x[..., 0].numel():
        return weights.reshape(x.shape[:-1])
    return weights


class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))``, as three linears."""

    def __init__(self, hidden: int, intermediate: int, act_fn: Callable[[Tensor], Tensor], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = RoutedLinear(hidden, intermediate, **kw)
        self.up_proj = RoutedLinear(hidden, intermediate, **kw)
        self.down_proj = RoutedLinear(intermediate, hidden, **kw)
        self.gate_proj.reads_block_input = self.up_proj.reads_block_input = True
        self.act_fn = act_fn

    def forward(self, x: Tensor, rows: Tensor) -> Tensor:
        linears = (self.gate_proj, self.up_proj, self.down_proj)
        for lin in linears:
            lin.rows = rows
        try:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        finally:
            for lin in linears:
                lin.rows = None


class UnfusedExperts(nn.ModuleList):
    """Per-expert linears with the fused experts module's call signature and arithmetic.

    ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``: each hit expert runs
    on its routed rows, its output is scaled by the routing weight and added at those rows, in the
    order of the fused loop (ascending expert index), so the result matches the fused module's.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "UnfusedExperts":
        """Copy a transformers fused experts module (``gate_up_proj [E, 2I, H]`` = gate rows then up rows,
        ``down_proj [E, H, I]``, ``act_fn``) into per-expert linears."""
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        num, two_i, hidden = gate_up.shape
        inter = two_i // 2
        if tuple(down.shape) != (num, hidden, inter):
            raise ValueError(f"fused experts of unexpected shapes: gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}")
        experts = []
        for e in range(num):
            ex = ExpertMLP(hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device)
            with torch.no_grad():
                ex.gate_proj.weight.copy_(gate_up[e, :inter])
                ex.up_proj.weight.copy_(gate_up[e, inter:])
                ex.down_proj.weight.copy_(down[e])
            experts.append(ex)
        return cls(experts)

    def fused_slices(self, prefix: str) -> dict[str, "FusedSlice"]:
        """Where each per-expert weight (full name, under this module's name ``prefix``) lies in the fused
        parameters it was made from (``prefix.gate_up_proj``, ``prefix.down_proj``, runtime layout): what
        a streamed load reads for it."""
        num = len(self)
        inter, hidden = self[0].gate_proj.out_features, self[0].gate_proj.in_features
        gate_up = (f"{prefix}.gate_up_proj", (num, 2 * inter, hidden))
        down = (f"{prefix}.down_proj", (num, hidden, inter))
        out = {}
        for e in range(num):
            out[f"{prefix}.{e}.gate_proj.weight"] = FusedSlice(*gate_up, e, (0, inter))
            out[f"{prefix}.{e}.up_proj.weight"] = FusedSlice(*gate_up, e, (inter, 2 * inter))
            out[f"{prefix}.{e}.down_proj.weight"] = FusedSlice(*down, e, None)
        return out

    #: While set (:meth:`alone`), the only expert that runs: the others add nothing to the output.
    only: int | None = None

    @contextlib.contextmanager
    def alone(self, expert: int) -> Iterator[None]:
        """Run expert ``expert`` only. Why: a scale candidate of one expert changes that expert's output
        alone, so the block's error equals that expert's routed contribution's error: comparing the
        block with the other experts left out, against a target recorded the same way, gives the same
        loss without running them (one expert's rows instead of every routed row, per candidate)."""
        self.only = expert
        try:
            yield
        finally:
            self.only = None

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        if self.only is not None:
            hit = [e for e in hit if e == self.only]
        for e in hit:
            pos, rows = torch.where((top_k_index == e).T)  # ordered by top-k slot, then token, as the fused loop
            y = self[e](hidden_states[rows], rows)
            y = y * top_k_weights[rows, pos, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


def running_modules(root: nn.Module) -> Iterator[nn.Module]:
    """``root.modules()`` less the experts that :meth:`UnfusedExperts.alone` leaves out: what a forward of
    ``root`` can run now. Why: work prepared per module for one forward (a dtype cast, a hook) is wasted on
    the 255 experts that stay idle while one expert's candidate is judged, and at 256 experts of 3 linears
    that waste was most of a MoE layer's scale search (docs/cost-qwen3.md)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        mod = todo.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield mod
        kids = [mod[mod.only]] if isinstance(mod, UnfusedExperts) and mod.only is not None else list(mod.children())
        todo.extend(reversed(kids))


@dataclass(frozen=True)
class FusedSlice:
    """One expert's weight inside a fused parameter: ``fused[expert, rows[0]:rows[1]]`` (all rows: None)."""

    fused: str  # full name of the fused parameter
    shape: tuple[int, ...]  # the fused parameter's runtime shape
    expert: int
    rows: tuple[int, int] | None

    def take(self, fused: Tensor) -> Tensor:
        t = fused[self.expert]
        return (t if self.rows is None else t[self.rows[0] : self.rows[1]]).contiguous()


def fused_slices(root: nn.Module, prefix: str = "") -> dict[str, FusedSlice]:
    """:meth:`UnfusedExperts.fused_slices` of every unfused experts module under ``root`` (full names
    under ``prefix``)."""
    out: dict[str, FusedSlice] = {}
    for name, mod in root.named_modules():
        if isinstance(mod, UnfusedExperts):
            out.update(mod.fused_slices(".".join(p for p in (prefix, name) if p)))
    return out


def unfuse_experts(root: nn.Module, is_fused: Callable[[nn.Module], bool]) -> list[str]:
    """Replace every module of ``root`` for which ``is_fused`` holds by :class:`UnfusedExperts`, in place.

    Returns the replaced modules' names. The fused parameters are freed as each is replaced, so the
    peak is one block's experts twice, not the model's.
    """
    names = [name for name, mod in root.named_modules() if is_fused(mod)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, UnfusedExperts.from_fused(getattr(parent, child)))
    return names


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 fused experts module (``gate_up_proj`` / ``down_proj`` parameters)."""
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and isinstance(getattr(module, "down_proj", None), nn.Parameter)


class RoutedExpertsAdapter:
    """Adapter mixin of a MoE family: its fused experts become per-expert linears at load (and wherever
    TLQ rebuilds the model: the streamed skeleton, the reload of an export). Put it before the family's
    adapter class in the bases."""

    routes_tokens = True

    def load(self, model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        model, processor = super().load(model_dir, device, dtype)  # type: ignore[misc]
        self.unfuse(model)
        return model, processor

    def unfuse(self, model: nn.Module) -> list[str]:
        return unfuse_experts(self.decoder_layers(model), is_fused_experts)  # type: ignore[attr-defined]


def expert_of(root: nn.Module, linears: list[nn.Module]) -> tuple[UnfusedExperts, int] | None:
    """The experts module under ``root`` and the index of the one expert that holds every one of
    ``linears``; None when they are not all inside a single routed expert."""
    for mod in root.modules():
        if isinstance(mod, UnfusedExperts):
            for e, expert in enumerate(mod):
                inside = {id(m) for m in expert.modules()}
                if all(id(lin) in inside for lin in linears):
                    return mod, e
    return None


def expert_smoothing(num_experts: int, extra_up_down: tuple[tuple[str, str], ...] = ()) -> tuple[SmoothMapping, ...]:
    """``up_proj -> down_proj`` per routed expert (and any ``extra_up_down`` pairs, e.g. a shared
    expert's), judged on the MoE block: its output is added to the layer output unchanged and maps each
    token on its own (``block_ends_layer``, ``rowwise``)."""
    pairs = (*extra_up_down, *((f"mlp.experts.{e}.up_proj", f"mlp.experts.{e}.down_proj") for e in range(num_experts)))
    return tuple(SmoothMapping(up, (down,), block="mlp", block_ends_layer=True, rowwise=True) for up, down in pairs)


def without_mlp(mappings: tuple[SmoothMapping, ...]) -> tuple[SmoothMapping, ...]:
    """A dense layer's mappings minus its MLP's (what a MoE layer keeps: the attention ones; the MoE
    block's own come from :func:`router_fold` and :func:`expert_smoothing`)."""
    return tuple(m for m in mappings if not m.prev.startswith(("post_attention_layernorm", "mlp.")))


def router_fold(num_experts: int, shared: tuple[str, ...] = (), passive: tuple[str, ...] = (), prev_offset: float = 0.0,
                norm: str = "post_attention_layernorm", router: str = "mlp.gate") -> SmoothMapping:
    """``norm -> every routed expert's gate/up`` (and the ``shared`` linears that read the norm too),
    with the scale folded into the router's columns as well (``passive``, with any other 16-bit reader).

    Why the router: it reads the same normed hidden states, so dividing the norm weight alone would
    change every routing decision; scaling its columns by ``s`` keeps its logits (hence the routing)
    exactly as they were, and the experts' inputs can be smoothed like a dense MLP's (for W-A schemes
    the only way to migrate the norm's outlier channels out of the experts' activations). The channel
    statistics come from the router's input (every token), not from one expert's routed rows; the
    candidate is judged on the MoE block (its output is added to the layer output unchanged)."""
    experts = tuple(f"mlp.experts.{e}.{p}" for e in range(num_experts) for p in ("gate_proj", "up_proj"))
    return SmoothMapping(norm, (*shared, *experts), block="mlp", block_ends_layer=True, rowwise=True,
                         passive=(router, *passive), prev_offset=prev_offset, stats_from=router)
