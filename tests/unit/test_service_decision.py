"""The decision (stream/decision.py): thresholds, abstention and their boundaries, pure."""

from __future__ import annotations

import pytest

from stream_classifier.config import DecisionSettings
from stream_classifier.stream.decision import Decider, Decision, column_thresholds

LABELS = ["billing", "delivery", "spam"]


def decider(thresholds: dict[str, float] | None = None, abstain: str | None = "unknown") -> Decider:
    return Decider(DecisionSettings(thresholds=thresholds or {}, abstain_label=abstain))


def decide(d: Decider, row: list[float], fitted: dict[str, float] | None = None) -> Decision:
    best = max(range(len(row)), key=row.__getitem__)
    return d.decide(LABELS, row, best, d.thresholds(LABELS, fitted or {}))


def test_exactly_at_the_threshold_is_published_under_the_top_label() -> None:
    d = decider({"spam": 0.9})
    assert decide(d, [0.05, 0.05, 0.9]) == Decision("spam", "spam", 0.9, abstained=False)


def test_just_below_the_threshold_abstains_with_the_argmax_kept() -> None:
    d = decider({"spam": 0.9})
    below = 0.9 - 1e-12
    assert decide(d, [0.05, 0.05 + 1e-12, below]) == Decision("unknown", "spam", below, abstained=True)


def test_a_label_without_a_threshold_is_always_itself() -> None:
    d = decider({"spam": 0.9})
    assert decide(d, [0.34, 0.33, 0.33]) == Decision("billing", "billing", 0.34, abstained=False)


def test_multi_class_each_label_has_its_own_threshold() -> None:
    d = decider({"billing": 0.5, "delivery": 0.8, "spam": 0.95})
    assert decide(d, [0.6, 0.3, 0.1]).label == "billing"
    assert decide(d, [0.2, 0.7, 0.1]) == Decision("unknown", "delivery", 0.7, abstained=True)
    assert decide(d, [0.1, 0.8, 0.1]).label == "delivery"
    assert decide(d, [0.02, 0.04, 0.94]).label == "unknown"


def test_configured_thresholds_override_fitted_ones_and_fitted_ones_apply_otherwise() -> None:
    d = decider({"spam": 0.5})
    fitted = {"spam": 0.99, "billing": 0.7}
    assert d.thresholds(LABELS, fitted) == [0.7, None, 0.5]
    assert decide(d, [0.1, 0.2, 0.7], fitted).label == "spam"  # 0.5 set beats the fitted 0.99
    assert decide(d, [0.65, 0.2, 0.15], fitted) == Decision("unknown", "billing", 0.65, abstained=True)
    assert column_thresholds(LABELS, {}, {}) == [None, None, None]


def test_without_an_abstain_label_every_message_gets_its_argmax() -> None:
    d = decider(abstain=None)
    assert not d.active
    fitted = {"spam": 0.99}
    assert d.thresholds(LABELS, fitted) == [None, None, None]  # fitted thresholds are ignored
    assert decide(d, [0.1, 0.1, 0.8], fitted) == Decision("spam", "spam", 0.8, abstained=False)


def test_thresholds_without_an_abstain_label_are_refused_at_load() -> None:
    with pytest.raises(ValueError, match="abstain_label"):
        DecisionSettings(thresholds={"spam": 0.9})


def test_a_threshold_of_zero_never_abstains_and_one_only_at_certainty() -> None:
    d = decider({"billing": 0.0, "spam": 1.0})
    assert decide(d, [0.34, 0.33, 0.33]).label == "billing"
    assert decide(d, [0.0, 0.0, 1.0]).label == "spam"
    assert decide(d, [0.0, 0.01, 0.99]).label == "unknown"
