"""Running a decoder layer for the rows that count only.

A scale candidate's loss weighs each token's output row by its token weight; with the token-level
calibration set most weights are zero, so those rows need not be computed at all. Two cuts give the
same loss for less work while a candidate is judged on a whole layer:

- a *row-wise* block (the MLP, a MoE block, ``o_proj``: each output row depends on its input row only)
  maps the kept rows only (:class:`RowsOnly`);
- causal self-attention computes keys and values for every token (a kept query still attends to every
  earlier token) but queries and outputs at the kept positions only (:class:`QueryRows`).

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


def _implementation(attn: nn.Module, name: str) -> Callable[..., tuple[Tensor, Any]]:
    """The attention function ``attn`` would call: a registered one, or its modeling file's eager one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return sys.modules[type(attn).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _query_rows_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          **kwargs: Any) -> tuple[Tensor, None]:
    """The registered attention function: ``query`` is ``[batch, heads, q, dim]``, the output
    ``[batch, q, heads, dim]`` as every transformers implementation returns it."""
    cut: QueryRows = module._tlq_query_rows
    rows = cut.rows[0]
    if rows is None:
        return cut.inner(module, query, key, value, attention_mask, **kwargs)
    # sdpa without a mask is causal by its flag (which a slice of the queries would misplace); eager never is
    causal = cut.name == "sdpa" and query.shape[2] > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True))
    mask = _mask_rows(attention_mask, rows, key.shape[-2], causal)
    out, _weights = cut.inner(module, query[:, :, rows], key, value, mask, **{k: v for k, v in kwargs.items() if k != "is_causal"})
    full = out.new_zeros(out.shape[0], query.shape[2], *out.shape[2:])
    full[:, rows] = out
    return full, None


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
