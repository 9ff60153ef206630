"""Paired significance of a difference between two calibrations scored on the same samples.

Two quantized models answer the same test questions, so their errors are correlated; an unpaired test
on the two accuracies would need far larger differences to say anything. McNemar's exact test uses only
the discordant samples (one model right, the other wrong): under "no difference" each discordant sample
is a fair coin, so the count where the first model wins is Binomial(b + c, 1/2).

Against the FP16 model itself the same test asks which calibration keeps more of FP16's answers
(:func:`flip_test`; :class:`Flips` counts the changed ones).

For a continuous score that only ever compares as a ratio (KL divergence across seeds and cells spans
orders of magnitude), :func:`ratio_upper_bound` bounds the geometric-mean ratio of paired runs from
above: the question a non-inferiority decision asks ("is the new setting worse by more than a margin?").
:func:`difference_lower_bound` asks it of a score compared as a difference (accuracy per seed and cell).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class McNemar:
    """``wins``: samples only the first model answers right; ``losses``: only the second; ``p``: two-sided."""

    wins: int
    losses: int
    p: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binom_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (log-space sums; n is at most a few thousand)."""
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test of ``first`` vs ``second`` (per-sample correctness, same samples)."""
    if len(first) != len(second):
        raise ValueError(f"paired test needs the same samples: {len(first)} vs {len(second)} results")
    wins = sum(1 for a, b in zip(first, second) if a and not b)
    losses = sum(1 for a, b in zip(first, second) if b and not a)
    p = min(1.0, 2.0 * _binom_tail(min(wins, losses), wins + losses))
    return McNemar(wins, losses, p)


def kept(reference: Sequence[bool], run: Sequence[bool]) -> list[bool]:
    """Per sample, whether ``run`` keeps the reference's right/wrong answer (the complement of a flip)."""
    if len(reference) != len(run):
        raise ValueError(f"flips need the same samples: {len(reference)} reference vs {len(run)} results")
    return [a == b for a, b in zip(reference, run)]


@dataclass(frozen=True)
class Flips:
    """Samples whose right/wrong answer differs from the reference model's on the same sample.

    Why beside accuracy (Dutta et al., NeurIPS 2024, "Accuracy is Not All You Need"): a compressed model
    can score FP16's accuracy while answering other questions right, and a user who swaps it in sees every
    changed answer. ``lost``: right -> wrong; ``gained``: wrong -> right; ``n``: samples compared."""

    lost: int
    gained: int
    n: int

    @property
    def share(self) -> float:
        return (self.lost + self.gained) / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": self.share}


def flips(reference: Sequence[bool], run: Sequence[bool]) -> Flips:
    """The flips of ``run`` against ``reference`` (per-sample correctness, same samples)."""
    keep = kept(reference, run)
    lost = sum(1 for r, k in zip(reference, keep) if r and not k)
    return Flips(lost=lost, gained=keep.count(False) - lost, n=len(keep))


def flip_test(reference: Sequence[bool], first: Sequence[bool], second: Sequence[bool]) -> McNemar:
    """Exact McNemar on "keeps the reference's right/wrong answer": ``wins`` are the samples only ``first``
    keeps. Two calibrations can tie in accuracy and still differ here."""
    return mcnemar(kept(reference, first), kept(reference, second))


@dataclass(frozen=True)
class RatioBound:
    """Paired ratios ``new / ref``: ``geomean`` their geometric mean, ``upper`` its one-sided upper confidence
    bound (t distribution on the log ratios, ``n - 1`` degrees of freedom), ``log_std`` the log ratios' sample
    standard deviation."""

    n: int
    geomean: float
    upper: float
    log_std: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paired_t(new: Sequence[float], ref: Sequence[float], pair: Callable[[float, float], float], kind: str,
              confidence: float) -> tuple[float, float, float]:
    """For the paired values ``d = pair(new, ref)``: their mean, sample standard deviation, and the one-sided
    t half-width of the mean (``n - 1`` degrees of freedom). ``kind`` names the bound in the count error."""
    from scipy.stats import t

    if len(new) != len(ref) or len(new) < 2:
        raise ValueError(f"a paired {kind} bound needs at least two pairs of equal count, got {len(new)} and {len(ref)}")
    d = [pair(a, b) for a, b in zip(new, ref)]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    return mean, std, float(t.ppf(confidence, n - 1)) * std / math.sqrt(n)


def ratio_upper_bound(new: Sequence[float], ref: Sequence[float], confidence: float = 0.95) -> RatioBound:
    """Upper confidence bound of the geometric-mean ratio of paired positive scores (e.g. KL per seed and cell).

    Why logs: a rounding-level change scales a run's KL up or down by a factor, so the log ratio is the
    quantity whose mean over pairs is the systematic effect and whose spread is the noise."""
    if any(v <= 0 or not math.isfinite(v) for v in [*new, *ref]):
        raise ValueError("ratios need positive finite scores on both sides")
    mean, std, half = _paired_t(new, ref, lambda a, b: math.log(a / b), "ratio", confidence)
    return RatioBound(len(new), math.exp(mean), math.exp(mean + half), std, confidence)


@dataclass(frozen=True)
class DifferenceBound:
    """Paired differences ``new - ref``: their ``mean``, its one-sided ``lower`` confidence bound (t
    distribution, ``n - 1`` degrees of freedom) and the differences' sample standard deviation ``std``."""

    n: int
    mean: float
    lower: float
    std: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def difference_lower_bound(new: Sequence[float], ref: Sequence[float], confidence: float = 0.95) -> DifferenceBound:
    """Lower confidence bound of the mean paired difference of scores such as accuracy, one pair per (cell,
    calibration seed). Why runs and not answers as the unit: a token set or a draw changes which
    calibration data each seed sees, so the seed-to-seed spread is the noise a decision must clear."""
    if not all(math.isfinite(v) for v in [*new, *ref]):
        raise ValueError("differences need finite scores on both sides")
    mean, std, half = _paired_t(new, ref, lambda a, b: a - b, "difference", confidence)
    return DifferenceBound(len(new), mean, mean - half, std, confidence)
