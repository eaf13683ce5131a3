"""models.stats and the comparison summary against scipy's own t-test and t quantiles."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from models.stats import Interval, paired_difference
from tasks.compare import ChildResult, markdown_table, summarize


def _child(strategy: str, seed: int, acc: float) -> ChildResult:
    return ChildResult(strategy, seed, f"{strategy}-{seed}", acc, acc, 1.0, 10, 100.0, [], 0.01)


def test_interval_is_scipys_t_interval() -> None:
    values = [0.81, 0.84, 0.80, 0.86]
    interval = Interval.of(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)
    assert interval.high - interval.mean == pytest.approx(stats.t.ppf(0.975, 3) * stats.sem(values))


def test_one_value_has_no_interval() -> None:
    interval = Interval.of([0.9])
    assert interval.mean == 0.9 and not interval.defined and not interval.excludes_zero()


def test_paired_interval_is_scipys_ttest_rel() -> None:
    a = {0: 0.91, 1: 0.88, 2: 0.93, 3: 0.90}
    b = {0: 0.89, 1: 0.87, 2: 0.90, 3: 0.90, 9: 0.5}  # seed 9 has no partner: left out
    paired = paired_difference(a, b)
    test = stats.ttest_rel([a[s] for s in range(4)], [b[s] for s in range(4)])
    ci = test.confidence_interval(0.95)
    assert paired.n == 4
    assert (paired.low, paired.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert paired.excludes_zero() == (test.pvalue < 0.05)


def test_pairing_separates_what_independent_intervals_cannot() -> None:
    # The seeds move both strategies together (large spread), while b trails a by about a point on each seed.
    a = [0.80, 0.86, 0.92]
    b = [0.789, 0.848, 0.911]
    assert Interval.of(a).low < Interval.of(b).high  # independent 95% intervals overlap
    comparison = summarize([_child("a", s, v) for s, v in enumerate(a)] + [_child("b", s, v) for s, v in enumerate(b)])
    assert (comparison.winner, comparison.runner_up, comparison.separated) == ("a", "b", True)
    assert comparison.margin == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert "excludes 0: separated" in comparison.verdict()
    assert stats.ttest_rel(a, b).pvalue < 0.05


def test_not_separated_when_the_paired_interval_contains_zero() -> None:
    comparison = summarize([_child("a", s, v) for s, v in enumerate((0.90, 0.80, 0.85))]
                           + [_child("b", s, v) for s, v in enumerate((0.84, 0.83, 0.84))])
    assert comparison.winner == "a" and not comparison.separated
    assert "includes 0: not separated" in comparison.verdict()


def test_one_seed_says_so_instead_of_overlaps() -> None:
    comparison = summarize([_child("a", 0, 0.9), _child("b", 0, 0.8), _child("c", 0, 0.7)])
    assert comparison.verdict().endswith("one seed: no interval")
    assert not comparison.separated and "overlap" not in comparison.verdict()
    table = markdown_table(comparison)
    assert "-0.1000 (one seed)" in table and "-0.2000 (one seed)" in table and "| winner |" in table


def test_every_row_carries_its_paired_difference_to_the_winner() -> None:
    results = [_child(name, s, base + 0.01 * s + (0.002 * s * s if name == "c" else 0.0))
               for name, base in (("a", 0.9), ("b", 0.85), ("c", 0.7)) for s in range(3)]
    comparison = summarize(results)
    assert [r.strategy for r in comparison.rows] == ["a", "b", "c"]
    assert comparison.rows[0].versus_winner is None
    for row in comparison.rows[1:]:
        assert row.versus_winner is not None and row.separated
        assert row.versus_winner.mean == pytest.approx(comparison.rows[0].accuracy.mean - row.accuracy.mean)
    assert math.isclose(comparison.rows[1].versus_winner.low, comparison.rows[1].versus_winner.high)  # constant gap
