"""The model adapter: everything TLQ needs to know about one VLM architecture.

Algorithms and the layer-wise engine never name a model. They ask the adapter where the decoder layers
are, which tokens are visual, what to keep in 16 bits, and how to get layer 0's inputs. Model knowledge
is *data* (``ModelSpec``); the little code that differs per family overrides one method.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlq.config import ConfigError


@dataclass(frozen=True)
class SmoothMapping:
    """A producer and the linears that read its output (names relative to a decoder layer).

    Scale migration (AWQ, SmoothQuant) folds ``1/s`` into ``prev`` and ``s`` into ``linears``; which
    modules pair up is architecture knowledge, so it lives here as data.

    ``block`` is the smallest module whose output holds everything ``linears`` change (AWQ compares
    this output: attention for q/k/v, the MLP for gate/up, the linear itself when it is its block's last
    op). ``block_ends_layer`` says that the block's output is added unchanged to the decoder layer's
    output (the MLP of a pre-norm layer), so its error *is* the layer-output error and the search may
    measure the layer objective on the block alone, which is cheaper and gives the same number.
    ``rowwise`` says that the block maps each token's row on its own (an MLP, a single linear; never
    attention), so a candidate's token-weighted loss needs only the rows of tokens with a non-zero weight:
    with the token-level calibration set, the rows outside the budget never enter the search.
    """

    prev: str
    linears: tuple[str, ...]
    block: str = ""  # "" = the whole decoder layer
    block_ends_layer: bool = False
    rowwise: bool = False
    # Modules that also read prev's output but stay 16-bit (in the ignore list): the chosen scale is
    # folded into their columns too, so the fold stays exact, but they are never quantized, not even
    # while a candidate is judged (there the scale is an identity on them, so they are left alone).
    passive: tuple[str, ...] = ()
    # A norm that multiplies by (offset + weight), e.g. Qwen3.5's (1 + w): folding 1/s then sets
    # weight = (offset + weight) / s - offset.
    prev_offset: float = 0.0
    # The module whose input holds the mapping's channel statistics ("" = the first linear). Why: routed
    # experts each see only their tokens, while the scale divides prev's output for every token; a
    # MoE block's router reads them all.
    stats_from: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Where things live in one family of transformers VLMs (paths relative to the top-level model)."""

    family: str
    model_types: tuple[str, ...]  # config.model_type values handled by this spec
    model_class: str  # transformers class name
    decoder_layers: str  # dotted path to the decoder's nn.ModuleList
    final_norm: str  # the decoder's last norm, applied before the LM head
    lm_head: str
    # Modules kept in 16 bits, as regexes (compressed-tensors' "re:" convention) or exact names.
    # Regexes survive transformers' checkpoint-key renames; concrete names do not.
    ignore: tuple[str, ...]
    smooth_mappings: tuple[SmoothMapping, ...] = ()
    # The decoder layer's causal self-attention (a transformers attention module; absent from a layer that
    # has none, e.g. a linear-attention one): scale candidates judged on the whole layer compute its
    # queries at the calibration set's rows only.
    attention: str = "self_attn"
    lmms_eval_model: str | None = None  # lmms-eval's model class for these checkpoints (tlq eval --lmms-tasks)


class _StopForward(Exception):
    """Raised from a pre-hook to stop the model once layer 0's inputs are captured."""


@dataclass
class LayerInputs:
    """Layer 0's hidden states, the keyword arguments every decoder layer needs to run standalone, and
    what the model does between layers (``between``, read by :meth:`ModelAdapter.between_layers`).

    All three are captured by one forward pass and travel together: a walk over the decoder needs
    every one of them, and a resumed run recaptures all of them (only the hidden-state streams are
    checkpointed, never these inputs).
    """

    hidden_states: torch.Tensor  # [1, seq, hidden], on CPU
    kwargs: dict[str, Any]  # position embeddings, attention mask, position ids (tensors on CPU)
    between: dict[str, Any] = field(default_factory=dict)  # per-family data of between_layers (tensors on CPU)


# Layer kwargs that belong to incremental decoding, not to a standalone layer call.
_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")


def tree_to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a nested tuple/list/dict to ``device`` (floating tensors also to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: tree_to(v, device, dtype) for k, v in obj.items()}
    return obj


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:  # pragma: no cover - only on an adapter/model mismatch
        raise ConfigError(f"model has no module {path!r}: the adapter does not match this checkpoint") from exc


class ModelAdapter:
    """Generic behaviour shared by the families; subclasses override what differs."""

    spec: ModelSpec
    #: whether some decoder layers route tokens to experts (tlq.models.moe.RoutedExpertsAdapter sets it)
    routes_tokens: bool = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    # --- loading -------------------------------------------------------------------------------
    def load(self, model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """Load model and processor from a local directory (never the hub)."""
        import transformers

        cls = getattr(transformers, self.spec.model_class)
        model = cls.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        model.to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        return model, processor

    # --- structure -------------------------------------------------------------------------------
    def unfuse(self, model: nn.Module) -> list[str]:
        """Turn fused parameter blocks that TLQ cannot calibrate as they are (MoE experts) into the
        per-module linears it calibrates and exports, in place; returns the replaced modules' names.
        Called by :meth:`load` and by the reload of an export. Nothing to do for a dense family."""
        return []

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.spec.decoder_layers)  # type: ignore[return-value]

    def decoder_layer_prefix(self, index: int) -> str:
        """The module name of decoder layer ``index`` (as in ``model.named_modules()``)."""
        return f"{self.spec.decoder_layers}.{index}"

    def smooth_mappings(self, layer: nn.Module) -> tuple[SmoothMapping, ...]:
        """The scale-migration mappings of one decoder layer (the spec's; a family whose layers differ,
        e.g. MoE and dense MLP layers, picks per layer)."""
        return self.spec.smooth_mappings

    def check_supported(self, model: nn.Module) -> None:
        """Refuse configurations the standalone-layer replay cannot reproduce exactly."""
        text_cfg = getattr(model.config, "text_config", model.config)
        layer_types = set(getattr(text_cfg, "layer_types", None) or [])
        if len(layer_types) > 1:
            raise ConfigError(
                f"decoder mixes attention types {sorted(layer_types)} (sliding window); "
                "TLQ replays layers with layer 0's attention mask, so disable sliding window in config.json"
            )

    # --- tokens ----------------------------------------------------------------------------------
    def visual_mask(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean [batch, seq] mask of visual (image or video) tokens."""
        cfg = model.config
        ids = inputs["input_ids"]
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for attr in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            tok = getattr(cfg, attr, None)
            if tok is not None:
                mask |= ids == tok
        return mask

    def visual_token_grid(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, int] | None:
        """(rows, cols) layout of the first image's visual tokens, row-major, for drawing importance maps.

        The first ``rows * cols`` visual tokens of the sequence are the grid. ``None`` when the layout
        is unknown (or there is no image); only visualisation uses it.
        """
        return None

    def visual_token_boxes(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[Box | None] | None:
        """Where in the first image each of its visual tokens looks, in sequence order: ``(x0, y0, x1, y1)``
        as fractions of the image's width and height, or ``None`` for a token that covers no region (a
        row separator). ``None`` when the layout is unknown.

        Why: ground truth lives in image space (a generator knows where it drew its target), while the
        tokens' layout over the image is the model's own, so only the adapter can map one onto the
        other. The default is the row-major grid of :meth:`visual_token_grid`."""
        grid = self.visual_token_grid(model, inputs)
        return None if grid is None else grid_boxes(*grid)

    # --- between decoder layers -----------------------------------------------------------------
    def record_between(self, model: nn.Module, record: dict[str, Any]) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that fill ``record`` with what :meth:`between_layers` needs, during the layer-0 capture.

        They run in the same forward pass as the capture (which stops at decoder layer 0), so they
        must see that data *before* layer 0 runs, e.g. in the arguments the language model is called
        with. The default family does nothing between layers and records nothing.
        """
        return []

    def between_layers(self, index: int, hidden: torch.Tensor, between: dict[str, Any]) -> torch.Tensor:
        """What the model does to the hidden states after decoder layer ``index``, before layer ``index + 1``
        (after the last layer: before the final norm). Identity unless the family overrides it.

        ``between`` is :attr:`LayerInputs.between`; its tensors may sit on CPU, so an override moves
        what it uses to ``hidden``'s device and dtype (only the layers that use something pay a copy).
        It must stay differentiable with respect to ``hidden``: the importance pass back-propagates
        through it.
        """
        return hidden

    def layer_kwargs(self, index: int, kwargs: dict[str, Any], between: dict[str, Any]) -> dict[str, Any]:
        """Decoder layer ``index``'s keyword arguments, from layer 0's (``kwargs``) and ``between``.

        The same for every layer unless the layers differ in what they are called with (Qwen3.5: a
        causal mask for full-attention layers, a padding mask for linear-attention ones). Idempotent.
        """
        return kwargs

    def keeps_16bit(self, name: str) -> bool:
        """Whether module ``name`` (full name) is in the spec's ignore list (a ``re:`` pattern matched
        from the start of the name, as compressed-tensors does, or the exact name)."""
        return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in self.spec.ignore)

    def layer_step(self, index: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], between: dict[str, Any]) -> torch.Tensor:
        """Decoder layer ``index`` and then whatever the model does before the next one.

        The one step of every walk over the decoder (the engine's FP and quantized streams, both
        importance passes): a walk that called :func:`run_layer` alone would silently drop what the
        model adds between layers (e.g. Qwen3-VL's DeepStack visual features).
        """
        return self.between_layers(index, run_layer(layer, hidden, self.layer_kwargs(index, kwargs, between)), between)

    # --- layer 0 ---------------------------------------------------------------------------------
    @torch.no_grad()
    def capture_layer0_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> LayerInputs:
        """Run the vision tower, projector and embeddings, and stop at decoder layer 0.

        A forward pre-hook (with kwargs) sees exactly what the model passes to its layers, including
        the multimodal rotary position embeddings, so no model code is re-implemented or traced. The
        family's :meth:`record_between` hooks watch the same pass.
        """
        captured: dict[str, Any] = {}
        between: dict[str, Any] = {}

        def hook(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured["hidden_states"] = hidden.detach().to("cpu")
            captured["kwargs"] = {
                k: tree_to(v, "cpu") for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"
            }
            raise _StopForward

        handles = self.record_between(model, between)
        handles.append(self.decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "hidden_states" not in captured:
            raise RuntimeError("decoder layer 0 was never called; the adapter does not match this model")
        return LayerInputs(captured["hidden_states"], captured["kwargs"], tree_to(between, "cpu"))


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the image's width and height


def grid_boxes(rows: int, cols: int) -> list[Box]:
    """The boxes of a ``rows x cols`` grid of tokens covering the whole image, row-major."""
    return [(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)]


def read_model_type(model_dir: Path) -> str:
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{model_dir} has no config.json: pass a local Hugging Face model directory")
    with cfg_path.open() as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    if not model_type:
        raise ConfigError(f"{cfg_path} has no 'model_type'; is this a transformers checkpoint?")
    return str(model_type)


def hook_free_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` as it is now, without the forward hooks the engine put on it (activation
    quantizers, observers): a reference the calibration steps can run beside the module itself."""
    ref = copy.deepcopy(module)
    for m in ref.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    return ref


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call one decoder layer standalone and return its output hidden states.

    transformers 5 layers return a tensor; older ones return a tuple whose first item is the output.
    """
    return main_output(layer(hidden, **kwargs))


def main_output(out: Any) -> torch.Tensor:
    """A module's hidden-state output: the first item of a tuple (transformers' attention modules
    return ``(output, weights)``, older decoder layers ``(output, ...)``), else the output itself."""
    return out[0] if isinstance(out, (tuple, list)) else out
