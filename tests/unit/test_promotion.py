"""The promotion rule (pure): first model, if-better with margin, always, never, incomparable champions."""

from __future__ import annotations

import pytest

from tasks.promote import PROMOTED, REJECTED, SKIPPED, PromotionPolicy, decide


@pytest.mark.parametrize(("policy", "score", "champion", "champion_score", "outcome"), [
    (PromotionPolicy("if-better"), 0.50, None, None, PROMOTED),  # the first model becomes champion
    (PromotionPolicy("if-better"), 0.81, "3", 0.80, PROMOTED),
    (PromotionPolicy("if-better"), 0.80, "3", 0.80, REJECTED),  # a tie keeps the champion
    (PromotionPolicy("if-better", min_margin=0.02), 0.81, "3", 0.80, REJECTED),
    (PromotionPolicy("if-better", min_margin=0.02), 0.83, "3", 0.80, PROMOTED),
    (PromotionPolicy("always"), 0.10, "3", 0.80, PROMOTED),
    (PromotionPolicy("never"), 0.99, "3", 0.10, SKIPPED),
    (PromotionPolicy("never"), 0.99, None, None, SKIPPED),
])
def test_decide(policy: PromotionPolicy, score: float, champion: str | None, champion_score: float | None,
                outcome: str) -> None:
    decision = decide(policy, "4", score, champion, champion_score)
    assert decision.outcome == outcome
    assert decision.promoted == (outcome == PROMOTED)
    tags = decision.as_tags()
    assert tags["promotion"] == outcome and float(tags["challenger_score"]) == pytest.approx(score)
    if champion_score is not None:
        assert float(tags["champion_score"]) == pytest.approx(champion_score)


def test_incomparable_champion_is_not_replaced_unless_always() -> None:
    why = "champion classes differ"
    assert decide(PromotionPolicy("if-better"), "2", 0.99, "1", None, why).outcome == REJECTED
    assert decide(PromotionPolicy("if-better"), "2", 0.99, "1", None, why).reason == why
    assert decide(PromotionPolicy("always"), "2", 0.10, "1", None, why).outcome == PROMOTED


def test_a_champion_from_other_test_data_is_judged_on_this_runs_split_and_says_so() -> None:
    """The documented rule: both scores come from this run's test split; when the champion's own split had
    another digest, the reason and the promotion_test_data tag say 'incomparable: different test data'."""
    from tasks.promote import INCOMPARABLE_TEST_DATA

    note = f"{INCOMPARABLE_TEST_DATA} (champion's aaaa, this run's bbbb)"
    better = decide(PromotionPolicy("if-better"), "4", 0.9, "3", 0.8, test_data=note)
    worse = decide(PromotionPolicy("if-better"), "4", 0.7, "3", 0.8, test_data=note)
    assert better.outcome == PROMOTED and worse.outcome == REJECTED
    for decision in (better, worse):
        assert INCOMPARABLE_TEST_DATA in decision.reason
        assert decision.as_tags()["promotion_test_data"] == note
    same = decide(PromotionPolicy("if-better"), "4", 0.9, "3", 0.8, test_data="same")
    assert INCOMPARABLE_TEST_DATA not in same.reason and same.as_tags()["promotion_test_data"] == "same"
