"""Confidence intervals for scores measured over a few training seeds.

A study that trains each variant with n seeds and scores each checkpoint reports, per variant, the
mean over seeds with a two-sided t-interval (Student 1908: mean +- t_{1-a/2, n-1} s / sqrt(n), s the
sample standard deviation), and for two variants the difference of their means with Welch's interval
(Welch 1947: standard error sqrt(s1^2/n1 + s2^2/n2), degrees of freedom by the Welch-Satterthwaite
formula), since the seeds of two variants are independent runs. The interval is over seeds only:
the caption sampling is held fixed (every checkpoint is scored on the same captions), so it says how
much the result moves with another training run, which is what a claim about a recipe needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval (``low``, ``high``); ``n`` the samples behind it."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def covers_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _t(level: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` with its t-interval; a single value gives an unbounded interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t(level, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def difference_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """mean(a) - mean(b) with Welch's interval (independent samples, variances not assumed equal)."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        raise ValueError("no values")
    ma, mb = sum(a) / na, sum(b) / nb
    if na < 2 or nb < 2:
        return Interval(ma - mb, -math.inf, math.inf, min(na, nb))
    va = sum((v - ma) ** 2 for v in a) / (na - 1) / na
    vb = sum((v - mb) ** 2 for v in b) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(ma - mb, ma - mb, ma - mb, min(na, nb))
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = _t(level, df) * se
    return Interval(ma - mb, ma - mb - half, ma - mb + half, min(na, nb))


def verdict(name_a: str, name_b: str, diff: Interval) -> str:
    """What the interval of ``a - b`` supports, in words."""
    if diff.covers_zero:
        return "not distinguishable at this budget"
    return f"{name_a} better" if diff.estimate > 0 else f"{name_b} better"
