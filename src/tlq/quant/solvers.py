"""Per-linear calibrators: observe a linear layer's inputs, then solve its quantized weight.

The layer-wise engine drives these without knowing which algorithm runs: it feeds inputs (and, for the
token-weighted forms, per-token weights) to ``observe`` and asks ``solve`` for the result.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from tlq.config import GPTQConfig, QuantScheme
from tlq.quant.gptq import CrossAccumulator, HessianAccumulator, gptq_quantize
from tlq.quant.quantizer import QuantizedWeight
from tlq.quant.rtn import rtn_quantize


class LinearCalibrator(Protocol):
    needs_inputs: bool
    needs_fp_inputs: bool  # observe() also wants the FP model's inputs of the same tokens (x_fp)

    def observe(self, x: Tensor, token_weights: Tensor | None = None, x_fp: Tensor | None = None) -> None: ...

    def solve(self, weight: Tensor) -> QuantizedWeight: ...

    def reduce(self, ctx: Any) -> None:
        """Sum the statistics across ranks (a no-op in one process)."""
        ...


class RTNCalibrator:
    """Round-to-nearest: data-free, the floor every method must beat."""

    needs_inputs = False
    needs_fp_inputs = False

    def __init__(self, scheme: QuantScheme, scale_dtype: torch.dtype | None) -> None:
        self.scheme = scheme
        self.scale_dtype = scale_dtype

    def observe(self, x: Tensor, token_weights: Tensor | None = None, x_fp: Tensor | None = None) -> None:  # pragma: no cover - unused
        return None

    def reduce(self, ctx: Any) -> None:
        return None

    def solve(self, weight: Tensor) -> QuantizedWeight:
        return rtn_quantize(weight, self.scheme.weights, scale_dtype=self.scale_dtype)


class GPTQCalibrator:
    """GPTQ on the (optionally token-weighted) Hessian of the inputs the layer really receives.

    With ``cfg.target == "fp"`` it also accumulates how the FP model's inputs differ from those
    (:class:`CrossAccumulator`) and solves for ``W X_fp`` instead of ``W X_q``.
    """

    needs_inputs = True

    def __init__(self, weight: Tensor, scheme: QuantScheme, cfg: GPTQConfig, scale_dtype: torch.dtype | None, device: torch.device | str) -> None:
        self.scheme = scheme
        self.cfg = cfg
        self.scale_dtype = scale_dtype
        self.hessian: HessianAccumulator | None = HessianAccumulator(weight.shape[1], device=device)
        form = None if cfg.fp_shift == "deferred" else "output"  # None: by shape
        self.cross = CrossAccumulator(weight, device=device, form=form) if cfg.target == "fp" else None

    @property
    def needs_fp_inputs(self) -> bool:
        return self.cross is not None

    @property
    def num_tokens(self) -> int:
        """Positive-weight token rows observed so far (all ranks' after :meth:`reduce`)."""
        return int(self.hessian.num_tokens) if self.hessian is not None else 0

    def observe(self, x: Tensor, token_weights: Tensor | None = None, x_fp: Tensor | None = None) -> None:
        self.hessian.add(x, token_weights)
        if self.cross is not None:
            if x_fp is None:
                raise ValueError("the FP target needs the FP inputs of the same tokens (x_fp)")
            self.cross.add(x_fp, x, token_weights)

    def reduce(self, ctx: Any) -> None:
        if ctx.enabled:
            from tlq.engine.distributed import reduce_cross_, reduce_hessian_

            reduce_hessian_(self.hessian)
            if self.cross is not None:
                reduce_cross_(self.cross)

    def solve(self, weight: Tensor) -> QuantizedWeight:
        """Solve once: the accumulator is released first and its Hessian handed over to the solver, so
        that no more than one ``in x in`` copy of it is alive during the factorisations."""
        if self.hessian is None:
            raise RuntimeError("this calibrator was solved already")
        acc, self.hessian = self.hessian, None
        cross, self.cross = self.cross, None
        # take_hessian() and take_shift() ([out, in] float32; the float64 sums are freed) passed straight
        # in: no local keeps them alive while the solver overwrites or frees them.
        return gptq_quantize(weight, acc.take_hessian(), self.scheme.weights, self.cfg, scale_dtype=self.scale_dtype,
                             consume_hessian=True, target_shift=None if cross is None else cross.take_shift())


def make_calibrator(method: str, weight: Tensor, scheme: QuantScheme, gptq: GPTQConfig, scale_dtype: torch.dtype | None, device: torch.device | str) -> LinearCalibrator:
    """The calibrator of ``method`` for the linear whose ``weight`` (``[out, in]``) it will solve."""
    if method == "rtn":
        return RTNCalibrator(scheme, scale_dtype)
    if method == "gptq":
        return GPTQCalibrator(weight, scheme, gptq, scale_dtype, device)
    raise ValueError(f"no calibrator for method {method!r}")
