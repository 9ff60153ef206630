"""The layer-wise importance pass: per-layer, per-token gradients of the answer loss.

For one calibration sample the loss is the next-token cross-entropy of its answer tokens under the FP
model (``answer_mask``; the logits at position ``t - 1`` predict token ``t``), averaged over that
sample's answer tokens — so every sample carries the same total loss weight whatever its length. For
every decoder layer ``l`` and token ``t`` the pass returns ``||g[l, t]||^2`` (or ``||g[l, t]||``) where
``g[l, t] = dL / dh[l, t]`` is the gradient with respect to layer ``l``'s *output* hidden state.

Layers are chained by the adapter's step (``ModelAdapter.layer_step``: the layer, then what the model
does before the next one, e.g. Qwen3-VL's DeepStack addition), so ``h[l]`` is the next layer's input.
What the model adds between layers is a constant (it does not depend on ``h``), so the gradient is also
that of the layer's own output.

It never holds the whole model's autograd graph:

1. forward, no grad: layer 0's inputs (``ModelAdapter.capture_layer0_inputs``), then each layer in turn;
   every layer's input is stored on CPU (one ``[seq, hidden]`` tensor per layer);
2. the head (final norm + LM head, on the positions that predict answer tokens only) runs with autograd
   on the last layer's output: its gradient is ``g[L-1]``;
3. walking backwards, layer ``l`` is recomputed from its stored input with ``requires_grad`` on that
   input only (parameters are frozen during the pass and restored afterwards) and ``g[l]`` is
   back-propagated through it: the input's gradient is ``g[l-1]``.

Peak memory is one layer's graph plus the boundary activations; the gradients equal full
back-propagation (tested in float32 against ``model(...).backward()``).

``at="linear"`` also keeps, for every linear layer inside each decoder layer, the gradient with respect
to *that linear's own output*, read off the same recomputation (step 3). It is the first-order weight of
an error in that linear's output at token ``t``: a ``k_proj`` error at a visual token reaches the loss
through every later query, which the gradient at the decoder layer's output does not see.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tlq.config import GRAD_AT
from tlq.data.calibration import CalibSample
from tlq.models.base import LayerInputs, ModelAdapter, get_submodule, tree_to
from tlq.models.moe import RoutedLinear
from tlq.models.streaming import LayerSource
from tlq.utils.precision import matmul_autocast


@dataclass
class TokenGradients:
    """Result of the importance pass for one sample."""

    # float32 on CPU: ||dL/dh[l, t]||^2 (or ||.|| with squared=False), [num_layers, seq]; with
    # at="linear" [num_layers, 1 + len(linear_names), seq]: the decoder layer's output, then each linear's.
    grad: Tensor
    loss: float  # mean answer-token cross-entropy (nan when the sample has no predictable answer token)
    num_answer_tokens: int  # answer tokens that enter the loss (an answer token at position 0 cannot)
    linear_names: tuple[str, ...] = ()  # with at="linear": the linears of a decoder layer, by name within it
    curvature: float = float("nan")  # the answer's mean softmax curvature under the FP model (softmax_curvature)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter for the duration, then restore each flag."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_targets(input_ids: Tensor, answer_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions whose logits enter the loss and the tokens they must predict.

    ``answer_mask[t]`` marks token ``t`` as a target, predicted by the logits at ``t - 1``; a target at
    position 0 has no predictor and is skipped. Returns ``(positions [n], targets [n])``.
    """
    ids = input_ids.reshape(-1)
    mask = answer_mask.reshape(-1).to(torch.bool).clone()
    mask[0] = False
    targets_at = mask.nonzero().reshape(-1)
    return targets_at - 1, ids[targets_at]


def head_loss(adapter: ModelAdapter, model: nn.Module, hidden: Tensor, positions: Tensor, targets: Tensor) -> tuple[Tensor, float]:
    """Mean cross-entropy (float32) of ``targets`` from the last decoder layer's output ``hidden`` [1, seq, d],
    and the answer's mean softmax curvature (:func:`softmax_curvature`) at the same positions.

    Only the predicting positions go through the final norm and LM head: the norm is per token, so
    the loss and its gradient are those of the full head.
    """
    norm = get_submodule(model, adapter.spec.final_norm)
    head = get_submodule(model, adapter.spec.lm_head)
    logits = head(norm(hidden[:, positions.to(hidden.device)]))[0].float()
    return nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="mean"), softmax_curvature(logits.detach())


def softmax_curvature(logits: Tensor) -> float:
    """``1 - sum_v p_v^2``, averaged over positions: the trace of the softmax's covariance
    ``diag(p) - p p^T``, which is the curvature of ``KL(p || softmax(z + d))`` in a logit error ``d``.
    0 for a sure prediction (no small error moves it), up to ``1 - 1/V`` for a uniform one."""
    p = logits.softmax(-1)
    return float((1.0 - p.pow(2).sum(-1)).mean())


def layer_linear_names(layers: Any) -> tuple[str, ...]:
    """The ``nn.Linear`` modules of the decoder layers that get importance rows of their own, by their
    names within a layer (module order; the union over layers whose linears differ, e.g. MoE and dense
    MLP layers: a name a layer lacks keeps zeros there and is never asked for).

    Routed expert linears get none: each sees only its tokens, and hundreds of experts would multiply
    the importance store; they take the layer output's row (the MoE block's output is added to it
    unchanged, so its gradient is that row's)."""
    names: dict[str, None] = {}
    for layer in layers:
        names.update((name, None) for name, mod in layer.named_modules() if isinstance(mod, nn.Linear) and not isinstance(mod, RoutedLinear))
    return tuple(names)


def _backward_through(adapter: ModelAdapter, index: int, layer: nn.Module, x: Tensor, kwargs: dict[str, Any], between: dict[str, Any], g: Tensor, linear_names: tuple[str, ...], squared: bool,
                      matmul_dtype: str = "compute") -> tuple[Tensor, list[Tensor]]:
    """Recompute the step of decoder layer ``index`` on ``x`` with autograd and back-propagate ``g`` (the
    step output's gradient); the recomputation's matmuls in ``matmul_dtype`` (:mod:`tlq.utils.precision`),
    whose backward then runs in it too.

    Returns the input's gradient and, for each of ``linear_names``, the norms of the gradient at that
    linear's output (zeros for a linear the output does not depend on).
    """
    outputs: dict[str, Tensor] = {}
    present = {name for name, _ in layer.named_modules()}
    hooks = [
        layer.get_submodule(name).register_forward_hook(lambda _m, _a, y, name=name: outputs.__setitem__(name, y))
        for name in linear_names
        if name in present
    ]
    try:
        x = x.requires_grad_(True)
        with matmul_autocast(matmul_dtype, x.device):
            y = adapter.layer_step(index, layer, x, kwargs, between)
    finally:
        for h in hooks:
            h.remove()
    ran = [n for n in linear_names if n in outputs]  # a linear the forward never called has no gradient
    grads = dict(zip(["", *ran], torch.autograd.grad(y, [x, *(outputs[n] for n in ran)], grad_outputs=g.to(y.dtype), allow_unused=True)))
    zeros = torch.zeros(x.shape[1], dtype=torch.float32)
    rows = [_norms(grads[n], squared) if grads.get(n) is not None else zeros for n in linear_names]
    return grads[""], rows


def layerwise_token_gradients(adapter: ModelAdapter, model: nn.Module, sample: CalibSample, *, squared: bool = True, device: torch.device | str | None = None, at: str = "output", layer0: LayerInputs | None = None,
                              matmul_dtype: str = "compute") -> TokenGradients:
    """Per-layer, per-token gradient norms of one sample's answer loss, computed one layer at a time.

    ``squared=True`` (default) gives ``||g||^2`` (the importance TLQ uses), ``False`` gives ``||g||``.
    ``at="output"`` takes the gradient w.r.t. each layer's output hidden state (DESIGN's definition);
    ``at="input"`` w.r.t. its input, which also counts how an error at token ``t`` reaches later tokens
    through this layer's attention (at the last layer, output gradients are zero except where answers
    are predicted, although k/v errors there still reach them).
    ``device`` defaults to the model's. A sample without predictable answer tokens gets all-zero
    gradients (and a warning): it carries no loss, hence no importance. ``matmul_dtype``: the decoder
    layers' matmuls, forward and backward (:mod:`tlq.utils.precision`); the head's loss stays float32.
    """
    if at not in GRAD_AT:
        raise ValueError(f"gradient position must be one of {GRAD_AT}, got {at!r}")
    dev = torch.device(device) if device is not None else _model_device(model)
    layers = adapter.decoder_layers(model)
    num_layers, seq = len(layers), sample.seq_len
    names = layer_linear_names(layers) if at == "linear" else ()
    shape = (num_layers, 1 + len(names), seq) if names else (num_layers, seq)
    positions, targets = answer_targets(sample.inputs["input_ids"], sample.answer_mask)
    if positions.numel() == 0:
        warnings.warn("calibration sample has no answer token to score; its token gradients are zero", stacklevel=2)
        return TokenGradients(torch.zeros(shape), float("nan"), 0, names)

    li = layer0 if layer0 is not None else adapter.capture_layer0_inputs(model, tree_to(sample.inputs, dev))
    kwargs, between = tree_to(li.kwargs, dev), li.between
    grads = torch.zeros(shape, dtype=torch.float32)

    with frozen_parameters(model), torch.enable_grad():
        # 1. forward without a graph, keeping every layer's input on CPU.
        stored: list[Tensor] = []
        with torch.no_grad(), matmul_autocast(matmul_dtype, dev):
            h = li.hidden_states.to(dev)
            for i, layer in enumerate(layers):
                stored.append(h.to("cpu"))
                h = adapter.layer_step(i, layer, h, kwargs, between)
        # 2. head loss -> gradient at the last layer's output.
        out = h.detach().requires_grad_(True)
        loss, curvature = head_loss(adapter, model, out, positions, targets)
        (g,) = torch.autograd.grad(loss, out)
        del out, h
        # 3. walk backwards through the layers, one graph at a time.
        for i in range(num_layers - 1, -1, -1):
            if at == "output":
                grads[i] = _norms(g, squared)
                if i == 0:
                    break
            elif at == "linear":
                grads[i, 0] = _norms(g, squared)
            g, rows = _backward_through(adapter, i, layers[i], stored[i].to(dev), kwargs, between, g, names, squared, matmul_dtype)
            if at == "input":
                grads[i] = _norms(g, squared)
            for k, row in enumerate(rows):
                grads[i, 1 + k] = row
            stored[i] = None  # type: ignore[call-overload]  # free the boundary as soon as it is used
    return TokenGradients(grads, float(loss.detach()), int(positions.numel()), names, curvature)


def _norms(g: Tensor, squared: bool) -> Tensor:
    sq = g.detach()[0].float().pow(2).sum(-1)
    return (sq if squared else sq.sqrt()).to("cpu")


def token_gradients(adapter: ModelAdapter, model: nn.Module, samples: list[CalibSample], *, squared: bool = True, device: torch.device | str | None = None, progress: bool = False, at: str = "output", layers: LayerSource | None = None, store: Callable[[list[Tensor]], Any] = list, layer0: list[LayerInputs] | None = None,
                    matmul_dtype: str = "compute") -> list[TokenGradients]:
    """Token gradients of every sample, in order.

    With a loaded model (``layers`` None), sample by sample (:func:`layerwise_token_gradients`): one
    sample's layer inputs are held at a time. With a streamed layer source (``tlq.models.streaming``),
    layer by layer for all samples (:func:`streamed_token_gradients`): each layer is loaded once
    forward and once backward. Both give the same gradients. ``layer0``: the samples' layer-0 inputs when
    the caller has them already (the engine needs the same ones), so the vision tower runs once per sample.
    """
    if layers is not None:
        return streamed_token_gradients(adapter, model, layers, samples, squared=squared, device=device, at=at, store=store, progress=progress, layer0=layer0, matmul_dtype=matmul_dtype)
    bar: Any = tqdm(range(len(samples)), desc="token importance", unit="sample", disable=not progress)
    return [layerwise_token_gradients(adapter, model, samples[i], squared=squared, device=device, at=at, layer0=None if layer0 is None else layer0[i], matmul_dtype=matmul_dtype)
            for i in bar]


def streamed_token_gradients(adapter: ModelAdapter, model: nn.Module, layers: LayerSource, samples: list[CalibSample], *, squared: bool = True, device: torch.device | str | None = None, at: str = "output", store: Callable[[list[Tensor]], Any] = list, progress: bool = False, layer0: list[LayerInputs] | None = None,
                             matmul_dtype: str = "compute") -> list[TokenGradients]:
    """The layer-wise pass in layer-major order, for a model whose layers are loaded one at a time.

    ``layers`` hands out decoder layer ``i`` (``load(i)``) and takes it back (``release(i)``). Every
    layer's inputs (all samples) are kept until the backward walk reaches that layer, in containers
    made by ``store`` (an ``ActivationStore`` spills them to disk beyond a memory budget).
    """
    if at not in GRAD_AT:
        raise ValueError(f"gradient position must be one of {GRAD_AT}, got {at!r}")
    dev = torch.device(device) if device is not None else _model_device(model)
    num_layers = len(layers)
    targets = [answer_targets(s.inputs["input_ids"], s.answer_mask) for s in samples]
    scored = [i for i, (pos, _t) in enumerate(targets) if pos.numel() > 0]
    if len(scored) < len(samples):
        warnings.warn(f"{len(samples) - len(scored)} calibration samples have no answer token to score; their token gradients are zero", stacklevel=2)
    names: tuple[str, ...] = ()
    losses = [float("nan")] * len(samples)
    curvatures = [float("nan")] * len(samples)
    firsts = [layer0[i] if layer0 is not None else adapter.capture_layer0_inputs(model, tree_to(samples[i].inputs, dev)) for i in scored]
    kwargs = [tree_to(f.kwargs, dev) for f in firsts]  # small (positions, mask): moved once, used 2L times
    between = [f.between for f in firsts]  # stays on CPU: the adapter's step moves what a layer uses
    bar: Any = tqdm(total=2 * num_layers, desc="token importance (streamed)", unit="layer", disable=not progress)
    with frozen_parameters(model), torch.enable_grad():
        # 1. forward, layer by layer: keep every layer's inputs.
        inputs: list[Any] = []
        h = [f.hidden_states for f in firsts]
        del firsts
        with torch.no_grad(), matmul_autocast(matmul_dtype, dev):
            for i in range(num_layers):
                layer = layers.load(i)
                if at == "linear":  # the union over layers, in layer order (as the in-memory pass)
                    names = tuple(dict.fromkeys(names + layer_linear_names([layer])))
                inputs.append(store(h))
                h = [adapter.layer_step(i, layer, x.to(dev), kw, b).to("cpu") for x, kw, b in zip(h, kwargs, between)]
                layers.release(i)
                bar.update()
        grads = [torch.zeros((num_layers, 1 + len(names), s.seq_len) if names else (num_layers, s.seq_len), dtype=torch.float32) for s in samples]
        # 2. head loss of each sample -> gradient at the last layer's output.
        g: list[Tensor] = []
        for i, x in zip(scored, h):
            out = x.to(dev).requires_grad_(True)
            loss, curvatures[i] = head_loss(adapter, model, out, *targets[i])
            g.append(torch.autograd.grad(loss, out)[0])
            losses[i] = float(loss.detach())
        del h
        # 3. backward, layer by layer.
        for li in range(num_layers - 1, -1, -1):
            if at != "input":  # the output gradient: the whole row, or row 0 next to the linears'
                for k, i in enumerate(scored):
                    grads[i][li if at == "output" else (li, 0)] = _norms(g[k], squared)
            if at != "output" or li > 0:
                layer = layers.load(li)
                for k, i in enumerate(scored):
                    g[k], rows = _backward_through(adapter, li, layer, inputs[li][k].to(dev), kwargs[k], between[k], g[k], names, squared, matmul_dtype)
                    for r, row in enumerate(rows):
                        grads[i][li, 1 + r] = row
                    if at == "input":
                        grads[i][li] = _norms(g[k], squared)
                layers.release(li)
            _close(inputs[li])
            inputs[li] = None
            bar.update()
    bar.close()
    return [TokenGradients(grads[i], losses[i], int(targets[i][0].numel()), names, curvatures[i]) for i in range(len(samples))]


def _close(container: Any) -> None:
    """Free a store of layer inputs (an ``ActivationStore`` removes its spill files)."""
    close = getattr(container, "close", None)
    if close is not None:
        close()
