"""Paired significance of an accuracy difference between two models scored on the same samples.

Two quantized models answer the same test questions, so their errors are correlated; an unpaired test
on the two accuracies would need far larger differences to say anything. McNemar's exact test uses only
the discordant samples (one model right, the other wrong): under "no difference" each discordant sample
is a fair coin, so the count where the first model wins is Binomial(b + c, 1/2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence


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
