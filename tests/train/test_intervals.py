"""The ablation's interval code against closed forms: Student's t-interval and Welch's interval on fixed
samples (worked by hand), and their coverage on known normal samples."""

from __future__ import annotations

import math
import random

import pytest

from ldmgraph.train.intervals import difference_interval, mean_interval, verdict

T_975_DF2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom (tables)
T_975_DF4 = 2.7764451051977934


def test_t_interval_of_three_values_by_hand() -> None:
    interval = mean_interval([2.0, 4.0, 6.0])  # mean 4, s = 2, n = 3
    half = T_975_DF2 * 2.0 / math.sqrt(3)
    assert interval.estimate == 4.0 and interval.n == 3
    assert interval.low == pytest.approx(4.0 - half, abs=1e-9) and interval.high == pytest.approx(4.0 + half, abs=1e-9)


def test_welch_interval_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0], [6.0, 8.0, 10.0]  # means 2 and 8; variances 1 and 4; n 3 and 3
    va, vb = 1.0 / 3, 4.0 / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite: 2.941...
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = difference_interval(a, b)
    assert diff.estimate == -6.0
    assert diff.low == pytest.approx(-6.0 - half, abs=1e-9) and diff.high == pytest.approx(-6.0 + half, abs=1e-9)
    assert not diff.covers_zero and verdict("a", "b", diff) == "b better"
    # equal variances and sizes: Welch's df is 2(n - 1), the pooled t-test's
    same = difference_interval([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert same.high - same.estimate == pytest.approx(T_975_DF4 * math.sqrt(2 / 3), abs=1e-9)
    assert same.covers_zero and verdict("a", "b", same) == "not distinguishable at this budget"


def test_one_seed_supports_no_claim() -> None:
    assert mean_interval([0.5]).covers_zero or math.isinf(mean_interval([0.5]).high)
    assert verdict("a", "b", difference_interval([0.6], [0.5])) == "not distinguishable at this budget"


def test_coverage_on_known_normal_samples_is_95_percent() -> None:
    rng = random.Random(7)
    trials, hits, diff_hits = 4000, 0, 0
    for _ in range(trials):
        a = [rng.gauss(1.0, 2.0) for _ in range(5)]
        b = [rng.gauss(0.5, 0.5) for _ in range(4)]
        m = mean_interval(a)
        hits += m.low <= 1.0 <= m.high
        d = difference_interval(a, b)
        diff_hits += d.low <= 0.5 <= d.high
    # binomial standard error at 95%: 0.0034; 0.93..0.97 is about six of them
    assert 0.93 <= hits / trials <= 0.97, hits / trials
    assert 0.93 <= diff_hits / trials <= 0.975, diff_hits / trials
