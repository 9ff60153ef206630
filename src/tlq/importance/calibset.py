"""The token-level calibration set: which token rows enter each layer's statistics, with which weight.

Attention needs whole sequences, so the engine still runs every layer on full sequences; the set only
decides which tokens' inputs enter each linear layer's statistics (weighted Hessian, scale-search loss)
and how much each counts. Per sample and per layer row (weights may differ by layer) it keeps a budget
of tokens:

* the budget is ``token_count`` tokens, or ``round(token_fraction * n)`` of the sample's ``n`` valid
  tokens (at least 1, at most ``n``); every valid token (prompt, visual and answer) is a candidate;
* ``token_floor`` raises it to at least the sample's share of the floor, ``ceil(n * floor / N)`` of
  the set's ``N`` valid tokens: a set smaller than the floor keeps every token;
* each modality present in the sample first gets its ``min_modality_share`` of the budget (its top
  tokens by weight, or all of them if it has fewer), so neither visual nor text tokens vanish;
* the rest of the budget goes to the highest-weight remaining tokens. Ties are broken by a seeded
  permutation (not by position), so uniform weights select a random, reproducible subset;
* ``rank="random"`` fills the budget (reservations included) by a seeded random draw instead of by
  weight, whatever the weights: the control for what ranking by importance buys at the same budget.
* ``rank="sampled"`` draws the budget in proportion to the weights and re-weights what it draws by the
  inverse of its chance (:func:`sample_tokens`): an unbiased estimate of the whole weighted set rather
  than its heaviest tokens (no modality reservation: the estimate covers every modality in expectation).
* ``rank="coupled"`` draws with the same chances, a layer's rows from one shared random number per token
  (:func:`sample_tokens_coupled`): as unbiased, ``k`` tokens on average, and the rows overlap as much as
  their chances allow.

Selected tokens keep their integrated weights; the others get weight 0, which the engine's statistics
drop. :meth:`TokenCalibrationSet.weight_fn` is the engine's ``token_weights`` callback.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tlq.config import SelectionConfig
from tlq.data.calibration import CalibSample
from tlq.importance.gradients import TokenGradients, token_gradients
from tlq.importance.weights import ImportanceConfig, integrate, layer_rows, sample_factors
from tlq.models.base import ModelAdapter


def select_tokens(weights: Tensor, visual_mask: Tensor, cfg: SelectionConfig | None = None, valid_mask: Tensor | None = None, generator: torch.Generator | None = None, total_valid: int | None = None) -> Tensor:
    """Zero the weights of the tokens left out of the budget, per layer row: ``[L, seq] -> [L, seq]``
    (``[L, rows, seq]`` per-linear weights: every row chooses its own tokens). ``total_valid``: the
    valid tokens of the whole calibration set, for ``cfg.token_floor``."""
    cfg = cfg or SelectionConfig()
    if weights.dim() == 3 and cfg.rank != "coupled":
        return select_tokens(weights.flatten(0, 1), visual_mask, cfg, valid_mask, generator, total_valid).reshape(weights.shape)
    w = weights.detach().float().cpu()
    num_layers, seq = w.shape[0], w.shape[-1]
    visual = visual_mask.reshape(-1).to(torch.bool).cpu()
    valid = torch.ones(seq, dtype=torch.bool) if valid_mask is None else valid_mask.reshape(-1).to(torch.bool).cpu()
    n = int(valid.sum())
    k = cfg.budget(n, total_valid)
    if k >= n:
        return w * valid
    if cfg.rank == "coupled":  # a layer's rows (all of them, or its one row) draw together
        return sample_tokens_coupled((w if w.dim() == 3 else w.unsqueeze(1)) * valid, k, generator).reshape(w.shape)
    if cfg.rank == "sampled":
        return sample_tokens(w * valid, k, generator)
    n_vis, n_txt = int((visual & valid).sum()), int((~visual & valid).sum())
    q_vis = min(math.ceil(cfg.min_modality_share * k), n_vis)
    q_txt = min(math.ceil(cfg.min_modality_share * k), n_txt)

    # Sort each row by weight (descending), ties in a seeded random order; invalid tokens last. A random
    # rank sorts by one seeded draw per token instead, shared by the rows: the same subset in every row.
    perm = torch.randperm(seq, generator=generator)
    score = torch.rand(seq, generator=generator).expand_as(w) if cfg.rank == "random" else w
    key = torch.where(valid, score, torch.full_like(w, -math.inf))[:, perm]
    order = perm[torch.argsort(key, dim=-1, descending=True, stable=True)]  # [L, seq] token indices
    vis_s, valid_s = visual[order], valid[order]
    txt_s = ~vis_s & valid_s
    vis_s = vis_s & valid_s
    reserved = (vis_s & (vis_s.cumsum(-1) <= q_vis)) | (txt_s & (txt_s.cumsum(-1) <= q_txt))
    rest = valid_s & ~reserved
    chosen_s = reserved | (rest & (rest.cumsum(-1) <= k - q_vis - q_txt))
    chosen = torch.zeros(num_layers, seq, dtype=torch.bool)
    chosen.scatter_(1, order, chosen_s)
    return w * chosen


def inclusion_probabilities(w: Tensor, k: int) -> Tensor:
    """Per row, ``pi = min(1, c * w)`` with ``c`` such that ``sum(pi) = k``: each token's chance of a place in
    a budget of ``k`` drawn in proportion to its weight, the heaviest capped at certainty. ``j`` tokens are
    capped where ``c_j = (k - j) / sum(the rest)`` first leaves the heaviest uncapped one at or below 1. A row
    with at most ``k`` positive weights keeps all of them (``pi = 1``) and no others."""
    s = w.double().sort(-1, descending=True).values
    n = s.shape[-1]
    tail = s.flip(-1).cumsum(-1).flip(-1)  # sum of s[j:], [R, n]
    j = torch.arange(n, dtype=s.dtype)
    c = (k - j) / tail.clamp(min=torch.finfo(s.dtype).tiny)
    ok = (c * s <= 1.0 + 1e-12) & (j < k) & (tail > 0)
    scale = c.gather(-1, ok.to(torch.int8).argmax(-1, keepdim=True))
    pi = torch.minimum(torch.ones_like(s[:, :1]), scale * w.double())
    return torch.where(ok.any(-1, keepdim=True), pi, (w > 0).double())


def sample_tokens(w: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``k`` tokens per row in proportion to their weights (:func:`inclusion_probabilities`; systematic
    sampling along a seeded random order, so exactly ``k`` whenever ``k`` tokens have weight) and give each
    drawn token ``w / pi``. The kept weights are then an unbiased estimate of all the weights (Horvitz-
    Thompson: every token's expected kept weight is its weight), so every statistic the engine sums over
    tokens is unbiased for the full weighted set, where top-k drops the light tokens for good. The
    estimate is bounded: an uncapped token's kept weight is ``1 / c``, the same for all of them."""
    pi = inclusion_probabilities(w, k)
    rows, seq = w.shape
    order = torch.rand(rows, seq, generator=generator).argsort(-1)
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    p = pi.gather(-1, order)
    cum = p.cumsum(-1)
    hit = torch.floor(cum - u) > torch.floor(cum - p - u)  # the lattice u, u + 1, ... falls in this token's interval
    chosen = torch.zeros(rows, seq, dtype=torch.bool).scatter_(-1, order, hit)
    return _reweighted(w, pi, chosen)


def sample_tokens_coupled(w: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw about ``k`` tokens per row of each group ``w[g]`` (``[groups, rows, seq]``: a layer's weight rows)
    with the chances of :func:`inclusion_probabilities`, all rows of a group from one uniform number ``u`` per
    token: a row keeps a token where ``u < pi`` and gives it ``w / pi``, as :func:`sample_tokens` does.

    Why: each row's draw is as unbiased as before (a token's chance of a place is exactly its ``pi``), but
    the rows now overlap as much as their chances allow (a token kept by a row is kept by every row where
    its chance is higher), so the union of a layer's rows, which bounds the rows a statistics pass of a
    group of linears computes (``tlq.engine.rows``), falls to ``sum max_r pi``, its least possible value;
    rows drawn on their own nearly double it at a 10% budget. (Measured at LLaVA-OneVision-0.5B widths the
    seconds did not follow: docs/cost.md, run 15.)
    The price is a size that varies (Poisson sampling: ``k`` on average, variance ``sum pi (1 - pi)`` at
    most ``k``), where the systematic draw keeps exactly ``k``. Groups (layers) draw independently."""
    pi = inclusion_probabilities(w.flatten(0, 1), k).reshape(w.shape)
    u = torch.rand(w.shape[0], 1, w.shape[-1], generator=generator, dtype=torch.float64)
    return _reweighted(w, pi, u < pi)


def _reweighted(w: Tensor, pi: Tensor, chosen: Tensor) -> Tensor:
    """The drawn tokens' Horvitz-Thompson weights ``w / pi`` (0 elsewhere), whichever draw chose them."""
    return torch.where(chosen, w.double() / pi.clamp(min=torch.finfo(pi.dtype).tiny), 0.0).float()


class TokenCalibrationSet:
    """Per-sample ``[num_layers, seq]`` token weights (0 = not selected) for the layer-wise engine.

    With per-linear importance (``linear_names``), ``[num_layers, 1 + K, seq]``: row 0 weighs the decoder
    layer's output (the scale search's loss) and row ``1 + k`` the inputs of linear ``linear_names[k]``.
    """

    def __init__(self, weights: list[Tensor], visual_masks: list[Tensor], valid_masks: list[Tensor] | None = None, selection: SelectionConfig | None = None, importance: ImportanceConfig | None = None, linear_names: tuple[str, ...] = (),
                 unbudgeted: list[Tensor] | None = None) -> None:
        if len(weights) != len(visual_masks):
            raise ValueError("one visual mask per sample is needed")
        if weights and len({tuple(w.shape[:-1]) for w in weights}) != 1:
            raise ValueError("every sample must have weights for the same number of layers")
        if weights:
            shape = tuple(weights[0].shape)
            if len(shape) != (3 if linear_names else 2) or (linear_names and shape[1] != 1 + len(linear_names)):
                raise ValueError(f"weights of shape {shape} do not match {len(linear_names)} linear names")
        self.linear_names = tuple(linear_names)
        self.weights = [w.detach().float().cpu() for w in weights]
        self.visual_masks = [m.reshape(-1).to(torch.bool).cpu() for m in visual_masks]
        self.valid_masks = (
            [m.reshape(-1).to(torch.bool).cpu() for m in valid_masks]
            if valid_masks is not None
            else [torch.ones(w.shape[-1], dtype=torch.bool) for w in self.weights]
        )
        self.selection = selection
        self.importance = importance
        # per sample [L, seq]: the layer rows' weights before the budget (every valid token weighted), for the
        # routed experts' statistics (SelectionConfig.experts_every_row); None where the budget dropped nothing
        # or nobody asked for them (a dense model): then every_token reads the kept weights
        self.unbudgeted = None if unbudgeted is None else [(layer_rows(u) * v).float().cpu() for u, v in zip(unbudgeted, self.valid_masks)]

    @classmethod
    def select(cls, weights: list[Tensor], visual_masks: list[Tensor], cfg: SelectionConfig | None = None, valid_masks: list[Tensor] | None = None, importance: ImportanceConfig | None = None, sample_ids: list[int] | None = None, linear_names: tuple[str, ...] = (), total_valid: int | None = None,
               keep_unbudgeted: bool = False) -> "TokenCalibrationSet":
        """Apply the token budget (:func:`select_tokens`) to every sample's integrated weights.

        ``total_valid`` is the whole calibration set's count of valid tokens (the budget's floor depends on
        it); a distributed run passes the sum over ranks, a single process may leave it to these samples'.
        ``keep_unbudgeted``: keep the layer rows' weights before the budget too, for a model whose routed
        experts read every routed row (``SelectionConfig.experts_every_row``); a dense model does not need
        them, and they would double the set's memory.
        """
        cfg = cfg or SelectionConfig()
        # One tie-breaking stream per sample, keyed by its global id: a sample's selection must not depend
        # on which other samples share its process (distributed runs shard them).
        ids = sample_ids if sample_ids is not None else list(range(len(weights)))
        gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + sid) for sid in ids]
        valids = valid_masks if valid_masks is not None else [None] * len(weights)
        if total_valid is None:
            total_valid = sum(int(w.shape[-1]) if v is None else int(v.sum()) for w, v in zip(weights, valids))
        selected = [select_tokens(w, m, cfg, v, g, total_valid) for w, m, v, g in zip(weights, visual_masks, valids, gens)]
        dropped = keep_unbudgeted and any(not torch.equal(layer_rows(a), layer_rows(b)) for a, b in zip(selected, weights))
        return cls(selected, visual_masks, valid_masks, cfg, importance, linear_names, unbudgeted=weights if dropped else None)

    # --- engine ------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.weights)

    @property
    def num_layers(self) -> int:
        return int(self.weights[0].shape[0]) if self.weights else 0

    def weight_fn(self):  # -> tlq.engine.layerwise.TokenWeightFn
        """``(layer_idx, sample_idx, linear=None, every_token=False) -> Tensor[seq]`` for
        ``LayerwiseEngine(token_weights=...)``: the weights of a linear's inputs (its name within the layer),
        or of the layer's output; ``every_token``: the layer's weights before the budget."""
        rows = {name: 1 + k for k, name in enumerate(self.linear_names)}

        def fn(layer: int, sample: int, linear: str | None = None, every_token: bool = False) -> Tensor:
            if not 0 <= layer < self.num_layers:
                raise IndexError(f"token weights cover {self.num_layers} layers, layer {layer} was asked for")
            if every_token and self.unbudgeted is not None:
                return self.unbudgeted[sample][layer]
            w = self.weights[sample][layer]
            if not self.linear_names:
                return w
            if linear is not None and linear not in rows:
                raise KeyError(f"no token weights for linear {linear!r}; the importance pass saw {list(rows)}")
            return w[rows.get(linear, 0)]

        return fn

    # --- reports -----------------------------------------------------------------------------------
    def selected_counts(self) -> dict[str, list[int]]:
        """Selected tokens per layer (its own row), summed over samples, split by modality; the tokens some
        weight row of the layer keeps (``union``: no kept-rows pass of the layer computes more rows: a
        group's statistics pass computes its group's union, the scale search the layer's own row); and the
        candidates."""
        vis = torch.zeros(self.num_layers, dtype=torch.long)
        txt = torch.zeros(self.num_layers, dtype=torch.long)
        union = torch.zeros(self.num_layers, dtype=torch.long)
        for w, m in zip(self.weights, self.visual_masks):
            sel = layer_rows(w) > 0
            vis += (sel & m).sum(-1)
            txt += (sel & ~m).sum(-1)
            union += ((w > 0).any(1) if w.dim() == 3 else w > 0).sum(-1)
        return {
            "visual": vis.tolist(),
            "text": txt.tolist(),
            "union": union.tolist(),
            "candidates_visual": sum(int((m & v).sum()) for m, v in zip(self.visual_masks, self.valid_masks)),
            "candidates_text": sum(int((~m & v).sum()) for m, v in zip(self.visual_masks, self.valid_masks)),
        }

    def visual_weight_share(self) -> list[float]:
        """Per layer: the share of the total weight (all samples) that sits on visual tokens."""
        vis = torch.zeros(self.num_layers, dtype=torch.float64)
        tot = torch.zeros(self.num_layers, dtype=torch.float64)
        for w, m in zip(self.weights, self.visual_masks):
            w = layer_rows(w)
            vis += (w * m).sum(-1).double()
            tot += w.sum(-1).double()
        return (vis / tot.clamp(min=1e-30)).tolist()

    def summary(self) -> dict[str, Any]:
        counts = self.selected_counts()
        return {
            "num_samples": self.num_samples,
            "num_layers": self.num_layers,
            "per_linear": list(self.linear_names),
            "selection": self.selection.to_dict() if self.selection else None,
            "importance": self.importance.to_dict() if self.importance else None,
            "candidate_tokens": {"visual": counts["candidates_visual"], "text": counts["candidates_text"]},
            "selected_tokens_per_layer": {"visual": counts["visual"], "text": counts["text"]},
            "union_tokens_per_layer": counts["union"],
            # the share of the candidates some weight row of a layer keeps, mean over layers (see selected_counts)
            "union_share": sum(counts["union"]) / max(1, self.num_layers * (counts["candidates_visual"] + counts["candidates_text"])),
            "visual_weight_share_per_layer": self.visual_weight_share(),
        }


def sample_valid_mask(sample: CalibSample) -> Tensor:
    """Tokens that exist (``attention_mask``; all of them for an unpadded batch of one)."""
    am = sample.inputs.get("attention_mask")
    return torch.ones(sample.seq_len, dtype=torch.bool) if am is None else am.reshape(-1).to(torch.bool).cpu()


def build_token_calibration_set(adapter: ModelAdapter, model: nn.Module, samples: list[CalibSample], importance: ImportanceConfig | None = None, selection: SelectionConfig | None = None, *, device: torch.device | str | None = None, progress: bool = False, gradients: list[TokenGradients] | None = None, sample_ids: list[int] | None = None, layers: Any = None, store: Any = list, layer0: list[Any] | None = None, total_valid: int | None = None,
                                reduce_sums: Callable[[list[float]], list[float]] | None = None, keep_unbudgeted: bool = False) -> TokenCalibrationSet:
    """Importance pass (skipped for ``kind="uniform"``) -> :func:`integrate` (-> each sample's factor,
    ``sample_weights="curvature"``) -> token budget.

    ``total_valid``: the whole set's valid tokens over all ranks (see :meth:`TokenCalibrationSet.select`);
    ``reduce_sums`` sums a list of numbers over ranks, for the sample factors' set-wide mean (:func:`sample_factors`).
    ``keep_unbudgeted``: also keep the weights before the budget (routed experts read them; see ``select``).
    Pass ``gradients`` (from :func:`token_gradients`) to reuse a pass already run; ``layers`` and
    ``store`` stream the pass over a model whose layers are loaded one at a time (see there); ``layer0``
    are the samples' layer-0 inputs if captured already.
    """
    importance = importance or ImportanceConfig()
    num_layers = len(adapter.decoder_layers(model))
    if gradients is None and importance.needs_gradients:
        gradients = token_gradients(adapter, model, samples, device=device, progress=progress, at=importance.grad_at, layers=layers, store=store, layer0=layer0,
                                    matmul_dtype=importance.matmul_dtype)
    raws = [g.grad for g in gradients] if gradients is not None else [torch.zeros(num_layers, s.seq_len) for s in samples]
    names = gradients[0].linear_names if gradients else ()
    valids = [sample_valid_mask(s) for s in samples]
    weights = [integrate(r, s.visual_mask, importance, v) for r, s, v in zip(raws, samples, valids)]
    if importance.sample_weights == "curvature":
        if gradients is None:
            raise ValueError("sample_weights='curvature' is read off the importance pass, which kind='uniform' does not run")
        factors = sample_factors([g.curvature for g in gradients], importance.sample_floor, reduce_sums)
        weights = [w * f for w, f in zip(weights, factors)]
    return TokenCalibrationSet.select(weights, [s.visual_mask for s in samples], selection, valids, importance, sample_ids, names, total_valid, keep_unbudgeted)
