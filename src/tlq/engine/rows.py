"""Running a decoder layer for the rows that count only.

A scale candidate's loss weighs each token's output row by its token weight; with the token-level
calibration set most weights are zero, so those rows need not be computed at all. Two cuts give the
same loss for less work while a candidate is judged on a whole layer:

- a *row-wise* block (the MLP, a MoE block, ``o_proj``: each output row depends on its input row only)
  maps the kept rows only (:class:`RowsOnly`);
- causal self-attention computes keys and values for every token (a kept query still attends to every
  earlier token) but queries and outputs at the kept positions only (:class:`QueryRows`), in chunks of
  kept rows that each read the keys up to their last row (what a causal kernel would skip stays skipped).

The rows not computed come back as zeros, which the loss never reads. Both cuts read the same shared
cell ``rows[0]`` (a 1-D index tensor, or ``None`` for every row), which the caller sets per sample.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn

#: The name under which the query cut is registered with transformers' attention dispatch.
QUERY_ROWS_ATTENTION = "tlq_query_rows"
#: Implementations the query cut wraps (their masks are additive or boolean, ``[batch, 1|heads, q, kv]``);
#: any other one (flash attention's varlen kernels) runs uncut.
_WRAPPABLE = ("sdpa", "eager")
#: Kept query rows are attended in this many causal chunks (:func:`_causal_chunks`), of at least _MIN_CHUNK rows.
_CHUNKS = 16
_MIN_CHUNK = 32


def outermost_row_blocks(mappings: Any) -> list[str]:
    """The row-wise blocks named by a layer's smoothing mappings (``SmoothMapping.rowwise``: the MLP or MoE
    block, ``o_proj``), without those inside another: cutting the outer one cuts what it contains."""
    names = {m.block for m in mappings if m.rowwise and m.block}
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names))


class RowsOnly:
    """While installed, ``module`` maps only the rows in ``rows[0]`` of its ``[batch, seq, ...]`` input
    and returns zeros in the others. A module whose output is not one tensor of the input's rows (a MoE
    block returning router logits too) runs whole."""

    def __init__(self, module: nn.Module, rows: list[Tensor | None]) -> None:
        self.module, self.rows, self.whole = module, rows, False
        self.forward = module.forward
        module.forward = self.__call__

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self.rows[0]
        if rows is None or self.whole or x.dim() != 3:
            return self.forward(x, *args, **kwargs)
        part = self.forward(x[:, rows], *args, **kwargs)
        if not isinstance(part, Tensor) or part.shape[:2] != (x.shape[0], rows.numel()):
            self.whole = True
            return self.forward(x, *args, **kwargs)
        out = part.new_zeros(*x.shape[:2], *part.shape[2:])
        out[:, rows] = part
        return out

    def remove(self) -> None:
        del self.module.forward  # the class's forward again


class QueryRows:
    """While installed, the transformers attention module ``attn`` attends from the query rows in
    ``rows[0]`` only: its config is swapped for a copy whose attention implementation is
    :data:`QUERY_ROWS_ATTENTION`, which slices the queries (after their rotary embedding) and the mask's
    query rows, calls the module's own implementation, and scatters the outputs into zeros.

    A module that does not dispatch through transformers' attention interface is left alone (see
    :func:`query_cut`)."""

    def __init__(self, attn: nn.Module, rows: list[Tensor | None]) -> None:
        _register()
        self.attn, self.rows, self.config = attn, rows, attn.config
        self.name = attn.config._attn_implementation
        self.inner = _implementation(attn, self.name)
        local = copy.copy(attn.config)
        local._attn_implementation_internal = QUERY_ROWS_ATTENTION  # the copy only: the model's config is untouched
        attn.config = local
        attn._tlq_query_rows = self

    def remove(self) -> None:
        self.attn.config = self.config
        del self.attn._tlq_query_rows


def query_cut(attn: nn.Module | None, rows: list[Tensor | None]) -> QueryRows | None:
    """:class:`QueryRows` on ``attn`` where it applies: a causal attention module of transformers (a
    ``config`` naming an implementation the cut wraps, ``is_causal``), else ``None``."""
    config = getattr(attn, "config", None)
    if attn is None or not getattr(attn, "is_causal", False) or getattr(config, "_attn_implementation", None) not in _WRAPPABLE:
        return None
    return QueryRows(attn, rows)


def row_cuts(layer: nn.Module, row_blocks: list[nn.Module], attention: str, rows: list[Tensor | None]) -> list[Any]:
    """Both cuts installed on ``layer``: its outermost row-wise blocks ``row_blocks`` (the adapter's mappings
    say which: the MLP, ``o_proj``; :func:`outermost_row_blocks`) map the kept rows only, and its causal
    attention (the adapter spec's ``attention`` name) computes queries at the kept rows only. Each has
    ``remove()``; while ``rows[0]`` is ``None`` they compute every row."""
    cuts: list[Any] = [RowsOnly(block, rows) for block in row_blocks]
    attn = query_cut(_submodule(layer, attention), rows)
    return cuts + ([attn] if attn is not None else [])


def layer_row_blocks(layer: nn.Module, adapter: Any) -> list[nn.Module]:
    """The outermost row-wise blocks of a decoder layer (or a copy of one), as its adapter's mappings name them."""
    return [layer.get_submodule(n) for n in outermost_row_blocks(adapter.smooth_mappings(layer))]


def layer_row_cuts(layer: nn.Module, adapter: Any, rows: list[Tensor | None]) -> list[Any]:
    """:func:`row_cuts` on a decoder layer (or a copy of one) where its adapter's mappings and spec say."""
    return row_cuts(layer, layer_row_blocks(layer, adapter), adapter.spec.attention, rows)


def kept_rows(weights: Tensor | None) -> Tensor | None:
    """The 1-D positions of ``weights`` (``[..., seq]``) above zero, or ``None`` where every row counts
    (no weights, or all positive): what ``rows[0]`` is set to per sample."""
    if weights is None:
        return None
    kept = (weights.reshape(-1) > 0).nonzero().reshape(-1)
    return None if kept.numel() == weights.numel() else kept


def weights_of_rows(weights: Tensor | None, x: Tensor, kept: Tensor | None) -> Tensor | None:
    """``weights`` (``[..., seq]``) of the rows ``x`` holds: all of them, or the kept ones where a row-wise
    block ran on the kept rows only (a linear or block inside it then sees ``x[:, kept]``)."""
    if weights is None or kept is None or x[..., 0].numel() == weights.numel():
        return weights
    return weights[..., kept.to(weights.device)]


def _submodule(layer: nn.Module, name: str) -> nn.Module | None:
    """``layer``'s submodule ``name``, or None where this layer has none (a linear-attention layer)."""
    try:
        return layer.get_submodule(name) if name else None
    except AttributeError:
        return None


def _implementation(attn: nn.Module, name: str) -> Callable[..., tuple[Tensor, Any]]:
    """The attention function ``attn`` would call: a registered one, or its modeling file's eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return sys.modules[type(attn).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _query_rows_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          **kwargs: Any) -> tuple[Tensor, None]:
    """The registered attention function: ``query`` is ``[batch, heads, q, dim]``, the output
    ``[batch, q, heads, dim]`` as every transformers implementation returns it. The kept rows are
    ascending (``nonzero`` of the token weights)."""
    cut: QueryRows = module._tlq_query_rows
    rows = cut.rows[0]
    if rows is None or (attention_mask is not None and attention_mask.dim() != 4):  # not a layout the cut knows
        return cut.inner(module, query, key, value, attention_mask, **kwargs)
    # causal: by the module (its mask then hides every later key), or for sdpa without a mask by its flag,
    # which a slice of the queries would misplace; eager without a mask attends everywhere
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True))) and query.shape[2] > 1
    causal = causal and (attention_mask is not None or cut.name == "sdpa")
    mask = _mask_rows(attention_mask, rows, key.shape[-2], causal)
    kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
    full = None
    for part in _causal_chunks(rows):
        last = int(rows[part[-1]]) + 1 if causal else key.shape[-2]  # no kept query of the chunk sees a later key
        chunk_mask = None if mask is None else mask[:, :, part.to(mask.device) if mask.shape[2] > 1 else slice(None), :last]
        out, _weights = cut.inner(module, query[:, :, rows[part]], key[:, :, :last], value[:, :, :last], chunk_mask, **kwargs)
        if full is None:
            full = out.new_zeros(out.shape[0], query.shape[2], *out.shape[2:])
        full[:, rows[part]] = out
    return full, None


def _causal_chunks(rows: Tensor) -> list[Tensor]:
    """Positions in ``rows`` (ascending) split into consecutive chunks, each attending to the keys up to its
    own last row only. Why: a causal kernel skips the keys after each query (half the work); a sliced,
    explicit mask cannot, so without chunks the cut would halve the queries and double the keys per query.
    Chunks of ``rows / _CHUNKS`` (at least ``_MIN_CHUNK``) give that half back up to ``1 / (2 * _CHUNKS)``."""
    size = max(_MIN_CHUNK, -(-rows.numel() // _CHUNKS))
    return list(torch.arange(rows.numel(), device=rows.device).split(size))


def _mask_rows(mask: Tensor | None, rows: Tensor, kv_len: int, causal: bool) -> Tensor | None:
    """The attention mask of the kept query rows. No mask and ``causal``: implicit causal attention over
    a sequence that is its own keys (a standalone layer call has no cache), so query ``i`` sees keys ``<= i``."""
    if mask is None:
        if not causal:
            return None
        return (torch.arange(kv_len, device=rows.device)[None, :] <= rows[:, None])[None, None]
    if mask.dim() == 4 and mask.shape[2] > 1:
        return mask[:, :, rows.to(mask.device)]
    return mask


def _register() -> None:
    from transformers import AttentionInterface

    if QUERY_ROWS_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(QUERY_ROWS_ATTENTION, _query_rows_attention)
