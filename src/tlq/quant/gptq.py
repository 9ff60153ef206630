"""GPTQ (Frantar et al., 2023) with token-weighted Hessians: pure tensor code, no model knowledge.

GPTQ minimises the layer's output reconstruction error ``sum_t w_t ||W x_t - Q x_t||^2 =
trace((W - Q) H (W - Q)^T)`` with ``H = sum_t w_t x_t x_t^T``. Plain GPTQ is ``w_t = 1``; TLQ's token
importance enters *only* through ``H`` (the same as feeding ``sqrt(w_t) x_t`` to plain GPTQ), so the
solver below is shared by both and the weighting lives in ``HessianAccumulator``.

The integer convention is the one of ``tlq.quant.quantizer`` (signed codes, ``(code - zp) * scale``), and
the returned ``QuantizedWeight`` dequantizes bit-for-bit to the weight GPTQ chose: every column is
rounded and dequantized with the very functions ``QuantizedWeight.dequantize`` uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from tlq.config import GPTQConfig, WeightQuantSpec
from tlq.utils.finite import NonFiniteError, dtype_hint, is_finite
from tlq.quant.quantizer import (
    QuantizedWeight,
    compute_qparams,
    dequantize_codes,
    group_size_of,
    quantize_codes,
)

# When the Cholesky factorisation of the damped Hessian fails, damping is multiplied by this factor and
# the factorisation retried, at most DAMP_MAX_RETRIES times (llm-compressor/GPTQModel use the same idea).
# A zero ``damp_percent`` restarts from DAMP_RETRY_START_PERCENT (the GPTQ paper's default, 1 %).
DAMP_RETRY_FACTOR = 10.0
DAMP_MAX_RETRIES = 4
DAMP_RETRY_START_PERCENT = 0.01


# --------------------------------------------------------------------------------------------------
# Hessian statistics
# --------------------------------------------------------------------------------------------------


class HessianAccumulator:
    """Running ``H = sum_t w_t x_t x_t^T`` and ``W = sum_t w_t`` over calibration tokens of one layer input.

    Precision: each ``add`` computes its batch product in float32 (the O(tokens * in^2) bulk of the work,
    fast on every GPU, accurate to ~1e-6 relative over one batch), and adds it to a **float64** running
    sum. Calibration adds hundreds of batches whose token weights span orders of magnitude; a float32
    running sum would drift by ~n_batches * 1e-7 and, worse, make the distributed result depend on how
    samples are sharded. In float64 the sum over batches and the all-reduce over ranks agree with the
    single-process result to ~1e-12, far below what GPTQ can resolve. ``dtype`` overrides the running-sum
    precision (e.g. float32 to halve memory for very wide layers).

    Distributed use: all-reduce (sum) ``raw_sum`` and ``total_weight`` (and ``num_tokens``) in place; both
    are tensors on ``device`` for that reason, and ``hessian`` is derived from them on demand.

    Symmetry: ``add`` computes only the row blocks' parts on and above the diagonal (:func:`_add_gram_`,
    half the multiply-adds of the whole product; at 7B widths a ``down_proj`` Hessian is 1.3e12 per sample of
    3,735 tokens); the lower part is copied from the upper when ``raw_sum`` is next read.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        *,
        dtype: torch.dtype = torch.float64,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.compute_dtype = compute_dtype
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self._lower_stale = False  # the upper part has sums the strictly-lower blocks have not been given yet
        self.total_weight = torch.zeros((), dtype=dtype, device=device)
        self.num_tokens = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self._sum.device

    @property
    def raw_sum(self) -> Tensor:
        """The running ``sum_t w_t x_t x_t^T`` (float64 by default), whole and symmetric: what an all-reduce sums."""
        if self._lower_stale:
            _mirror_upper_(self._sum)
            self._lower_stale = False
        return self._sum

    def add(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Accumulate tokens ``x`` ``[..., in]`` with optional non-negative weights ``[...]``.

        The product is formed as ``(sqrt(w) x)^T (sqrt(w) x)``, which is exactly symmetric and is the
        "feed sqrt(w_t) x_t to plain GPTQ" identity. Zero-weight tokens are dropped before the product
        (token selection zeroes most of them), so they cost nothing and leave the sum bit-identical to
        never having seen them.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=self.compute_dtype)
        keep, w, total = _positive_tokens(weights, x.shape[:-1], rows.shape[0], self.device, self.compute_dtype, self.total_weight.dtype)
        if keep is not None:
            rows = rows[keep] * w.sqrt().unsqueeze(1)
        if rows.shape[0] == 0:
            return
        _add_gram_(self._sum, rows)
        self._lower_stale = True
        self.total_weight += total
        self.num_tokens += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's statistics (what an all-reduce does across ranks)."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge {other.in_features}-feature statistics into {self.in_features}")
        _add_widened_(self.raw_sum, other.raw_sum.to(self.raw_sum.device))
        self.total_weight += other.total_weight.to(self.total_weight)
        self.num_tokens += other.num_tokens.to(self.num_tokens.device)

    @property
    def hessian(self) -> Tensor:
        """The normalised Hessian ``H / total_weight`` (a weighted mean of ``x x^T``), in ``dtype``.

        Normalising keeps the scale independent of how many tokens were seen, so that damping (relative
        to the mean diagonal anyway) and error values are comparable across layers and runs.
        """
        self._check_nonempty()
        return self.raw_sum / self.total_weight

    def take_hessian(self) -> Tensor:
        """:attr:`hessian`, computed in the running sum's own storage and handed over: the accumulator is
        left empty (no further ``add``), so that only one ``in x in`` buffer exists instead of two."""
        self._check_nonempty()
        h, self._sum = self.raw_sum.div_(self.total_weight), self._sum.new_empty(0)
        return h

    def _check_nonempty(self) -> None:
        if self.raw_sum.numel() == 0:
            raise RuntimeError("this accumulator's Hessian was taken already")
        if float(self.total_weight) <= 0:
            raise RuntimeError("no calibration tokens with positive weight reached this layer")


class CrossAccumulator:
    """Running statistics of how the FP model's inputs of a linear differ from the inputs the quantized
    path gives it, correlated with the latter: what turns GPTQ's target from ``W X_q`` into ``W X_fp``.

    GPTAQ-style asymmetric calibration: with ``H = sum_t w_t x_q x_q^T`` and
    ``D = sum_t w_t (x_fp - x_q) x_q^T``, ``sum_t w_t ||W x_fp,t - Q x_q,t||^2 = tr((Q - W*) H (Q - W*)^T) +
    const`` for ``W* = W + W D H^-1``, so GPTQ run on ``W*`` solves it (``gptq_quantize(..., target_shift=)``
    forms ``W*`` from its own factor of ``H``). Only the shift ``S = W D`` (``[out, in]``) is ever needed,
    and it can be accumulated in either of two forms (``form``; by default chosen per linear by its shape,
    which the solver asks for only with ``GPTQConfig.fp_shift == "deferred"``, else the output form):

    * ``"input"`` (``out >= in``: q/o projections, ``gate/up``): ``D`` itself, ``in x in``, one product of
      ``in^2`` per token row; ``W D`` is formed once, at :meth:`take_shift`.
    * ``"output"`` (``out < in``: a narrowing ``down_proj``, the small k/v): ``W D`` batch by batch, the
      rows first projected through ``W`` (``2 in out`` per row), an ``out x in`` sum instead of ``D``'s
      ``in x in`` — a fraction of it for ``down_proj``, whose ``in x in`` buffers are a layer's largest.

    Why by shape: the input form costs ``in^2`` per row plus ``out in^2`` once, the output form ``2 in out``
    per row; for ``out >= in`` the input form is cheaper from ``in`` rows on (which GPTQ's Hessian needs to
    be of full rank anyway), and its buffer is no larger (``gate/up`` at LLaVA-OneVision-0.5B widths: 0.8M
    instead of 8.7M multiply-adds per row each; docs/cost.md). Either way ``W`` must stay as it is until
    the solve, which holds in the engine: a linear's statistics are all observed before any of its group is
    solved. The difference is accumulated directly, so ``S = 0`` exactly where the streams agree. Same
    precision and distributed contract as :class:`HessianAccumulator`: float32 batch products, float64
    running sum, all-reduce ``raw_sum`` and ``total_weight``.
    """

    def __init__(self, weight: Tensor, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float64, form: str | None = None) -> None:
        if weight.ndim != 2:
            raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        if form not in (None, "input", "output"):
            raise ValueError(f"unknown cross-statistic form {form!r}; choose input, output or None (by shape)")
        self.weight = weight  # a reference, not a copy: the linear's own weight, unchanged until the solve
        out_f, self.in_features = weight.shape
        self.form = form or ("input" if out_f >= self.in_features else "output")
        shape = (self.in_features, self.in_features) if self.form == "input" else tuple(weight.shape)
        self.raw_sum = torch.zeros(shape, dtype=dtype, device=device)
        self.total_weight = torch.zeros((), dtype=dtype, device=device)

    def add(self, x_fp: Tensor, x_q: Tensor, weights: Tensor | None = None) -> None:
        """Accumulate aligned token rows of the FP and quantized inputs ``[..., in]`` (same tokens)."""
        if x_fp.shape != x_q.shape or x_q.shape[-1] != self.in_features:
            raise ValueError(f"FP inputs {tuple(x_fp.shape)} and quantized inputs {tuple(x_q.shape)} must have the same "
                             f"shape with {self.in_features} features: the two streams must hold the same tokens")
        device = self.raw_sum.device
        q = x_q.detach().reshape(-1, self.in_features).to(device, torch.float32)
        delta = x_fp.detach().reshape(-1, self.in_features).to(device, torch.float32) - q
        keep, w, total = _positive_tokens(weights, x_q.shape[:-1], q.shape[0], device, torch.float32, self.total_weight.dtype)
        if keep is not None:
            q, delta = q[keep], delta[keep] * w.unsqueeze(1)
        if q.shape[0] == 0:
            return
        if self.form == "output":
            delta = delta @ self.weight.detach().to(device, torch.float32).T  # [tokens, out]
        _add_product_(self.raw_sum, delta, q)
        self.total_weight += total

    def take_shift(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``S / total_weight`` (``[out, in]``, a token-weighted mean, like :attr:`HessianAccumulator.hessian`),
        in ``dtype``, handed over: the accumulator is left empty so that its float64 sum is freed."""
        if self.raw_sum.numel() == 0:
            raise RuntimeError("this accumulator's sum was taken already")
        if float(self.total_weight) <= 0:
            raise RuntimeError("no calibration tokens with positive weight reached this layer")
        raw, self.raw_sum = self.raw_sum, self.raw_sum.new_empty(0)
        mean = raw.div_(self.total_weight)
        if self.form == "output":
            return mean.to(dtype)
        # W D in float32 (what the solver works in), D rounded to float32 after its float64 sum
        w = self.weight.detach().to(mean.device, torch.float32)
        return (w @ mean.to(torch.float32)).to(dtype)


def apply_target_shift_(weight: Tensor, shift: Tensor, hinv_upper: Tensor) -> Tensor:
    """``weight += shift H^-1`` in place, with ``H^-1 = U^T U`` given by GPTQ's factor ``U``
    (:func:`_inverse_hessian_cholesky_`): ``W* = W + W D H^-1`` of :class:`CrossAccumulator`.

    Using the factor GPTQ computes anyway means the FP target costs no factorisation and no ``in x in``
    buffer of its own, and its correction is damped exactly as the GPTQ solve is: the damping shrinks
    ``W*`` towards ``W`` where ``H`` is ill-conditioned instead of amplifying noise. Row blocks keep the
    temporaries at ``_BLOCK_ROWS x in``.
    """
    u = hinv_upper.to(weight.dtype)
    for rows in _row_blocks(weight.shape[0]):
        weight[rows] += _times_upper(_times_upper_transposed(shift[rows].to(weight.dtype), u), u)
    return weight


def defer_target_shift_(weight: Tensor, shift: Tensor, hinv_upper: Tensor, *, in_place: bool = False) -> Tensor:
    """Half of :func:`apply_target_shift_`, leaving the rest to GPTQ's column loop: returns ``A = shift U^T``
    and adds ``A``'s diagonal share ``A diag(U)`` to ``weight`` in place.

    Why: ``W* = W + A U``, and GPTQ already multiplies by the strict upper part of ``U`` when it spreads
    each column's error ``e_j`` over the later columns (``w_k -= e_j U[j, k]``). Spreading ``e_j - A_j``
    instead adds exactly ``A``'s strict-upper share, so :func:`_solve_columns` given ``A`` visits the
    columns of ``W*`` without the second triangular product ever being formed: ``out x in^2 / 2``
    multiply-adds fewer per linear, the largest arithmetic of the FP target at 7B widths (a ``down_proj``
    with 18,944 inputs: 0.64e12). Exact up to float rounding (tested against the applied shift).
    Only for groups whose parameters are computed inside the loop: static groups need all of ``W*`` first.
    ``in_place=True`` writes ``A`` over ``shift`` (row block by row block, each needing only its own rows),
    so that a handed-over shift costs no second ``out x in`` buffer.
    """
    u = hinv_upper.to(weight.dtype)
    pending = shift if in_place and shift.dtype == weight.dtype else torch.empty_like(weight)
    diag = torch.diagonal(u)
    for rows in _row_blocks(weight.shape[0]):
        pending[rows] = _times_upper_transposed(shift[rows].to(weight.dtype), u)
        weight[rows] += pending[rows] * diag
    return pending


# Columns per step of the triangular products below: each step multiplies by a [_TRI_BLOCK, in] slab of
# ``U`` cut to its non-zero part, so the two products cost ~(1/2 + _TRI_BLOCK / (2 in)) of dense ones.
_TRI_BLOCK = 512


def _times_upper_transposed(a: Tensor, u: Tensor) -> Tensor:
    """``a @ u.T`` for an upper-triangular ``u`` (read on and above its diagonal only): output column block
    ``J`` needs ``a``'s columns from ``J``'s start on only (``u.T`` is zero above its diagonal).

    Why: the FP target's shift is two products with ``in x in`` factors, the largest arithmetic of its
    solve at 7B widths; skipping the zero half halves it."""
    n = u.shape[0]
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    for j0 in range(0, n, _TRI_BLOCK):
        j1 = min(j0 + _TRI_BLOCK, n)
        out[:, j0:j1] = a[:, j0:j1] @ torch.triu(u[j0:j1, j0:j1]).T + a[:, j1:] @ u[j0:j1, j1:].T
    return out


def _times_upper(a: Tensor, u: Tensor) -> Tensor:
    """``a @ u`` for an upper-triangular ``u`` (read on and above its diagonal only): output column block
    ``J`` needs ``a``'s columns up to ``J``'s end only (``u`` is zero below its diagonal)."""
    n = u.shape[0]
    out = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    for j0 in range(0, n, _TRI_BLOCK):
        j1 = min(j0 + _TRI_BLOCK, n)
        out[:, j0:j1] = a[:, :j0] @ u[:j0, j0:j1] + a[:, j0:j1] @ torch.triu(u[j0:j1, j0:j1])
    return out


# Rows per step of the blocked helpers below: their temporaries are this many rows of an in x in matrix
# (a few MB) instead of the whole matrix. Memory only: results do not depend on it.
_BLOCK_ROWS = 256


def _row_blocks(n: int) -> Iterator[slice]:
    """Slices of ``_BLOCK_ROWS`` consecutive rows covering ``range(n)``."""
    return (slice(start, start + _BLOCK_ROWS) for start in range(0, n, _BLOCK_ROWS))


def _add_widened_(total: Tensor, part: Tensor) -> None:
    """``total += part`` for a float64 ``total`` and a lower-precision ``part``, in row blocks.

    A plain mixed-dtype ``+=`` first casts all of ``part`` to float64: an extra ``in x in`` float64
    buffer (254 MB for a 5632-input ``down_proj``), the peak of a streamed GPTQ run. Element by
    element the result is the same.
    """
    for rows in _row_blocks(total.shape[0]):
        total[rows] += part[rows]


def _add_gram_(total: Tensor, a: Tensor) -> None:
    """``total += a^T a`` on and above ``total``'s diagonal row blocks only (block ``R`` gets its columns from
    ``R``'s start on); the strictly-lower blocks are left for :func:`_mirror_upper_`.

    Why: a Gram matrix is symmetric, so half of :func:`_add_product_`'s multiply-adds repeat the other half.
    Each computed entry is the same dot product as the whole product's, and the whole product of a matrix with
    itself is exactly symmetric, so the mirrored result equals it (bit for bit on CPU BLAS, tested)."""
    n = total.shape[0]
    for rows in _row_blocks(n):
        total[rows, rows.start:] += a[:, rows].T @ a[:, rows.start:]


def _mirror_upper_(total: Tensor) -> None:
    """Copy the blocks above the diagonal row blocks of a square ``total`` onto those below them (the lower
    part :func:`_add_gram_` leaves out)."""
    n = total.shape[0]
    for rows in _row_blocks(n):
        end = min(rows.stop, n)
        total[end:, rows] = total[rows, end:].T


def _add_product_(total: Tensor, a: Tensor, b: Tensor) -> None:
    """``total += a^T b`` (``a`` ``[n, m]``, ``b`` ``[n, k]``, ``total`` ``[m, k]``), one block of ``total``'s
    rows at a time: the float32 product never exists whole (127 MB for a 5632-input ``down_proj``'s
    Hessian batch, on top of the running sum). Each block is the same dot products as the whole
    product's rows; the sum is widened to ``total``'s dtype block by block."""
    for rows in _row_blocks(total.shape[0]):
        total[rows] += a[:, rows].T @ b



def _positive_tokens(weights: Tensor | None, token_shape: torch.Size, num_rows: int, device: torch.device | str,
                     dtype: torch.dtype, total_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, Tensor | float]:
    """The token rows a weighted statistic keeps: ``(mask, their weights in dtype, total weight in total_dtype)``.

    Zero-weight tokens (most of them under token selection) are dropped before any product, so they
    cost nothing and leave a sum bit-identical to never having seen them. Unweighted: no mask, and the
    total is the number of rows.
    """
    if weights is None:
        return None, None, float(num_rows)
    w = _check_token_weights(weights, token_shape).reshape(-1).to(device, dtype)
    keep = w > 0
    w = w[keep]
    return keep, w, w.to(total_dtype).sum()


def _check_token_weights(weights: Tensor, token_shape: torch.Size) -> Tensor:
    """Token weights must match the token dimensions and be finite and non-negative (they are squared norms)."""
    if tuple(weights.shape) != tuple(token_shape):
        raise ValueError(f"token weights of shape {tuple(weights.shape)} do not match tokens {tuple(token_shape)}")
    weights = weights.detach()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("token weights must be finite and non-negative")
    return weights


# --------------------------------------------------------------------------------------------------
# Error measures
# --------------------------------------------------------------------------------------------------


def layer_output_error(weight: Tensor, qweight_dequant: Tensor, hessian: Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the (token-weighted) output error GPTQ minimises.

    With ``H`` the normalised Hessian this is the weighted mean over tokens of ``||W x_t - Q x_t||^2``.
    Computed in float64 so that comparisons between solvers are not decided by rounding.
    """
    d = (weight.detach().double() - qweight_dequant.detach().double().to(weight.device))
    h = hessian.detach().to(device=d.device, dtype=torch.float64)
    return float(((d @ h) * d).sum())


def relative_layer_output_error(weight: Tensor, qweight_dequant: Tensor, hessian: Tensor) -> float:
    """``layer_output_error`` divided by ``trace(W H W^T)`` (the output energy): comparable across layers."""
    w = weight.detach().double()
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    energy = float(((w @ h) * w).sum())
    if energy <= 0:
        raise ValueError("trace(W H W^T) is zero: the layer's output is identically zero on this data")
    return layer_output_error(weight, qweight_dequant, hessian) / energy


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: WeightQuantSpec,
    cfg: GPTQConfig,
    scale_dtype: torch.dtype | None = None,
    consume_hessian: bool = False,
    target_shift: Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` column by column, compensating each rounding error on the
    not-yet-quantized columns through the inverse Hessian ``hessian`` ``[in, in]``.

    Groups: without act-order, a group's parameters are computed when the solver enters it, from the
    weights *as updated* by the error compensation so far (the GPTQ paper's choice). With act-order the
    columns are visited by decreasing ``diag(H)``; parameters then stay per contiguous *original* group
    ("static groups", computed from the original weights) so that the result is plain group quantization
    that compressed-tensors/vLLM can serve without a ``g_idx``.

    ``consume_hessian=True`` lets the solver overwrite ``hessian`` (and ``target_shift``) instead of copying
    it: an ``in x in`` float64 matrix is the largest buffer of the whole calibration for wide layers (a
    18944-input ``down_proj`` takes 2.9 GB per copy), so the engine hands over a Hessian it no longer needs.

    ``target_shift`` (``[out, in]``, from :meth:`CrossAccumulator.take_shift`, normalised like
    ``hessian``) makes the target the FP model's output: the columns are solved for
    ``W* = W + target_shift H^-1`` (with GPTQ's own damped inverse), and static group parameters are
    computed from ``W*``. With ``cfg.fp_shift == "deferred"`` and groups chosen inside the column loop,
    half of that product rides the loop's own error updates instead (:func:`defer_target_shift_`).
    """
    _check_gptq_inputs(weight, hessian, cfg)
    in_f = weight.shape[1]
    gsize = group_size_of(in_f, spec)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    if h.data_ptr() == hessian.data_ptr() and not consume_hessian:
        h = h.clone()
    # With consume_hessian the caller handed over its only reference (CPython moves call arguments
    # into the callee's frame): dropping ours lets the buffer go as soon as ``h`` is done with it.
    del hessian
    _mask_dead_columns(w, h)
    if target_shift is not None and tuple(target_shift.shape) != tuple(w.shape):
        raise ValueError(f"target shift of shape {tuple(target_shift.shape)} does not match the weight {tuple(w.shape)}")

    perm = _act_order_permutation(h) if cfg.act_order else torch.arange(in_f, device=w.device)
    if cfg.act_order:
        w, h = w[:, perm], h[perm][:, perm]
    col_group = [int(c) // gsize for c in perm.tolist()]

    hinv = _inverse_hessian_cholesky_(h, cfg)
    del h  # its storage held the float64 factor: free it before the column loop
    static = spec.group_size is None or cfg.act_order
    pending = None
    if target_shift is not None:
        # a dead column's shift is exactly zero (its quantized input is), so the masked weights stay zero
        shift = target_shift[:, perm] if cfg.act_order else target_shift
        del target_shift
        if static or cfg.fp_shift == "applied":  # static groups take their parameters from all of W* before the loop
            apply_target_shift_(w, shift, hinv)
        else:  # W*'s second product rides the solver's own error updates
            pending = defer_target_shift_(w, shift, hinv, in_place=consume_hessian)
        del shift

    if static:  # per channel, or act-order's static groups: from the (dead-masked) weights in original order
        scale, zero = compute_qparams(w[:, torch.argsort(perm)] if cfg.act_order else w, spec, scale_dtype)
    else:  # filled group by group inside the solver
        scale = torch.empty(w.shape[0], in_f // gsize, dtype=torch.float32, device=w.device)
        zero = torch.empty(w.shape[0], in_f // gsize, dtype=torch.int8, device=w.device)
    codes = _solve_columns(w, hinv, spec, cfg.block_size, col_group, scale, zero, gsize, not static, scale_dtype, pending)
    if cfg.act_order:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, spec=spec)


def _check_gptq_inputs(weight: Tensor, hessian: Tensor, cfg: GPTQConfig) -> None:
    """Fail early with a readable message instead of a NaN weight or a cryptic LAPACK error."""
    if weight.ndim != 2:
        raise ValueError(f"gptq_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    in_f = weight.shape[1]
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match {in_f} input features")
    if not is_finite(hessian):
        raise NonFiniteError(f"non-finite values (NaN/Inf) in a GPTQ Hessian of a {tuple(weight.shape)} weight: the calibration activations reaching it overflowed; {dtype_hint(weight.dtype)}")


def _mask_dead_columns(w: Tensor, h: Tensor) -> None:
    """Input features never seen (zero ``H`` diagonal) cannot affect the output: set their weights to 0
    (quantized exactly) and their diagonal to 1 so that ``H`` stays invertible. In place."""
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0


def _act_order_permutation(h: Tensor) -> Tensor:
    """Columns by decreasing ``diag(H)``: quantize the most influential inputs first, while many columns
    are left to absorb their error. A stable sort keeps ties deterministic (all ranks must agree)."""
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def _damping_schedule(cfg: GPTQConfig) -> Iterator[float]:
    """``damp_percent``, then increasingly strong damping for Hessians that are not positive definite."""
    yield cfg.damp_percent
    base = cfg.damp_percent if cfg.damp_percent > 0 else DAMP_RETRY_START_PERCENT
    for k in range(1, DAMP_MAX_RETRIES + 1):
        yield base * DAMP_RETRY_FACTOR**k


def _inverse_hessian_cholesky_(h: Tensor, cfg: GPTQConfig) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``), in float32.

    Memory: computed in ``h``'s own storage (which it overwrites) plus one float32 buffer of its size,
    instead of a float64 working copy: for a wide ``down_proj`` each ``in x in`` float64 buffer is
    hundreds of MB and the largest allocation of a streamed calibration. The float32 buffer first keeps
    a copy of ``H`` for a retry with stronger damping and finally receives ``U``. A retry therefore
    starts from ``H`` rounded to float32 (relative 6e-8, far below the damping it adds); the first
    attempt, the usual case, is computed from ``H`` exactly.

    GPTQ reads its error-compensation rows from ``U``: row ``i`` of ``U`` scaled by ``1 / U[i, i]`` is the
    update of the remaining columns after quantizing column ``i``, so one factorisation serves all steps.
    Factorised in float64: the one O(in^3) step, and the one that fails on ill-conditioned Hessians.
    """
    mean_diag = float(torch.diagonal(h).mean())
    backup = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    backup.copy_(h)
    # Column-major view (h is symmetric, so its values are the same): LAPACK's layout, which lets
    # torch factorise in the buffer itself instead of in a column-major temporary copy.
    work = h.mT
    for attempt, frac in enumerate(_damping_schedule(cfg)):
        if attempt > 0:
            work.copy_(backup.mT)
        work.diagonal().add_(frac * mean_diag)
        u = _try_inverse_cholesky_(work)
        if u is not None:
            if attempt > 0:
                warnings.warn(
                    f"GPTQ: Hessian not positive definite with damp_percent={cfg.damp_percent}; "
                    f"succeeded with {frac:g}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return backup.copy_(u)
    raise RuntimeError(
        f"GPTQ: Hessian is not positive definite even with damp_percent={frac:g}; "
        "check the calibration activations of this layer (all-equal or degenerate inputs?)"
    )


def _try_inverse_cholesky_(h: Tensor) -> Tensor | None:
    """``cholesky(inverse(h), upper=True)``, computed in ``h``'s own storage (which it overwrites and
    returns), or ``None`` if ``h`` is not positive definite (or the result not finite).

    On CPU by one factorisation and a triangular inverse: with ``J`` the order reversal and ``J h J = L
    L^T``, ``h^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular with a positive
    diagonal, so it *is* the factor. That is about half the operations of factorising, inverting and
    factorising again (measured: 0.42x the time at 3,000 inputs in float64, equal to 2e-15), and it is
    GPTQ's one O(in^3) step (its solve phase is 85% of the run at Qwen2-VL-7B widths, docs/cost.md).
    Torch has no triangular inverse, so LAPACK's comes through scipy (a dependency of scikit-learn);
    other devices take the two factorisations.
    """
    if h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64):
        return _try_inverse_cholesky_reversed_(h)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        return None
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    if int(info) != 0 or not is_finite(h):
        return None
    return h


def _try_inverse_cholesky_reversed_(h: Tensor) -> Tensor | None:
    """:func:`_try_inverse_cholesky_` on CPU: ``J (chol(J h J))^-1 J`` in ``h``'s storage."""
    from scipy.linalg import lapack

    info = torch.empty((), dtype=torch.int32)
    _reverse_(h)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        return None
    a = h.numpy()  # h's storage; LAPACK inverts the lower triangle in place, the zeros above stay
    fortran = a.flags.f_contiguous  # LAPACK's layout; a C-ordered h is handed over as its transpose
    inv, status = lapack.get_lapack_funcs("trtri", (a,))(a if fortran else a.T, lower=int(fortran), overwrite_c=1)
    if status != 0:
        return None
    if inv.__array_interface__["data"][0] != a.__array_interface__["data"][0]:  # worked on a copy
        h.copy_(torch.from_numpy(inv if fortran else inv.T))
    _reverse_(h)
    return h if is_finite(h) else None


def _reverse_(h: Tensor, chunk: int = 1 << 20) -> None:
    """``h <- J h J`` (both axes reversed) in place, in ``chunk``-element pieces: reversing both axes of
    a dense matrix reverses its storage, so no second ``in x in`` buffer is needed."""
    if not (h.is_contiguous() or h.mT.is_contiguous()):
        raise ValueError("_reverse_ needs a dense matrix (row- or column-major)")
    flat = h.as_strided((h.numel(),), (1,))
    n = flat.numel()
    for start in range(0, n // 2, chunk):
        stop = min(start + chunk, n // 2)
        front, back = flat[start:stop], flat[n - stop : n - start]
        tmp = front.clone()
        front.copy_(back.flip(0))
        back.copy_(tmp.flip(0))


def _solve_columns(
    w: Tensor,
    hinv: Tensor,
    spec: WeightQuantSpec,
    block_size: int,
    col_group: list[int],
    scale: Tensor,
    zero: Tensor,
    gsize: int,
    dynamic_groups: bool,
    scale_dtype: torch.dtype | None,
    pending: Tensor | None = None,
) -> Tensor:
    """GPTQ's lazy-batch loop over columns (in solver order); returns int8 codes in that order.

    Inside a block of ``block_size`` columns the updates are applied immediately to the block copy ``w1``;
    the rest of the matrix receives the block's accumulated errors in one matmul when the block ends,
    which is the same arithmetic, reorganised to be bound by matmuls instead of rank-1 updates.
    ``scale``/``zero`` are read (static) or filled (``dynamic_groups``) in place. ``pending``: the FP
    target's deferred shift (:func:`defer_target_shift_`), spread with the errors.
    """
    out_f, n = w.shape
    codes = torch.empty(out_f, n, dtype=torch.int8, device=w.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group[col]
            if dynamic_groups and col % gsize == 0:
                current = _current_group_weights(w, w1, err1, hinv, i1, i2, i, gsize, pending)
                s, z = compute_qparams(current, spec, scale_dtype)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g : g + 1], zero[:, g : g + 1]
            wc = w1[:, i : i + 1]
            c = quantize_codes(wc, s, z, spec)
            q = dequantize_codes(c, s, z, spec)  # the exact value QuantizedWeight.dequantize() returns
            codes[:, col] = c[:, 0]
            e = (wc - q) / hinv1[i, i]
            if pending is not None:
                e = e - pending[:, col : col + 1]
            w1[:, i + 1 :] -= e @ hinv1[i : i + 1, i + 1 :]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def _current_group_weights(
    w: Tensor, w1: Tensor, err1: Tensor, hinv: Tensor, i1: int, i2: int, i: int, gsize: int, pending: Tensor | None = None
) -> Tensor:
    """The group starting at solver column ``i1 + i``, with every error compensation so far applied.

    Columns inside the current block are up to date in ``w1``; columns past the block have not yet
    received this block's pending updates (lazy batching), so they are applied here to a copy. Without
    this, a group that starts mid-block (group size < block size, or not dividing it) would get its
    scale from stale weights and the result would depend on ``block_size``. A deferred FP-target shift
    (``pending``) reaches a column only as the columns before it are solved, so the share its own group's
    earlier columns still owe it is added too: the group's parameters are then those of ``W*``.
    """
    start, end = i1 + i, i1 + i + gsize
    current = w1[:, i : min(end, i2) - i1]
    if end > i2:
        current = torch.cat([current, w[:, i2:end] - err1 @ hinv[i1:i2, i2:end]], dim=1)
    if pending is not None:
        current = current + pending[:, start:end] @ torch.triu(hinv[start:end, start:end], diagonal=1)
    return current
