"""The promotion gate and the training-set merge (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_classifier.learn.challenger import score, score_probabilities
from stream_classifier.learn.feedback_set import FeedbackSnapshot
from stream_classifier.learn.gate import calibration_note, gate
from stream_classifier.learn.retrainer import merge_training_set
from stream_classifier.model.examples import Example


def _scores(
    champion: float,
    challenger: float,
    *,
    acc: tuple[float, float] | None = None,
    trusted: tuple[float, float] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    a_champ, a_chall = acc or (champion, challenger)
    out = {
        "champion": {"holdout": {"macro_f1": champion, "accuracy": a_champ}},
        "challenger": {"holdout": {"macro_f1": challenger, "accuracy": a_chall}},
    }
    if trusted is not None:
        out["champion"]["trusted"] = {"macro_f1": trusted[0], "accuracy": trusted[0]}
        out["challenger"]["trusted"] = {"macro_f1": trusted[1], "accuracy": trusted[1]}
    return out


def test_better_challenger_is_promoted() -> None:
    assert gate(_scores(0.5, 0.8), min_improvement=0.0, trusted=False).promote


def test_a_tie_does_not_promote() -> None:
    decision = gate(_scores(0.7, 0.7), min_improvement=0.0, trusted=False)
    assert not decision.promote
    assert "does not beat" in decision.reason


def test_improvement_must_exceed_the_minimum() -> None:
    assert not gate(_scores(0.70, 0.74), min_improvement=0.05, trusted=False).promote
    assert gate(_scores(0.70, 0.76), min_improvement=0.05, trusted=False).promote


def test_lower_accuracy_blocks_promotion() -> None:
    assert not gate(_scores(0.5, 0.6, acc=(0.8, 0.7)), min_improvement=0.0, trusted=False).promote


def test_falling_below_the_champion_on_the_trusted_set_blocks_promotion() -> None:
    decision = gate(_scores(0.5, 0.9, trusted=(0.9, 0.6)), min_improvement=0.0, trusted=True)
    assert not decision.promote
    assert "trusted" in decision.reason
    assert gate(_scores(0.5, 0.9, trusted=(0.9, 0.9)), min_improvement=0.0, trusted=True).promote


def test_score_counts_a_label_the_champion_cannot_predict() -> None:
    truth = ["a", "b", "new"]
    assert score(truth, ["a", "b", "a"])["accuracy"] < score(truth, ["a", "b", "new"])["accuracy"]
    assert score(truth, ["a", "b", "new"]) == {"macro_f1": 1.0, "accuracy": 1.0}


def test_merge_prefers_feedback_and_never_trains_on_held_out_texts() -> None:
    snapshot = FeedbackSnapshot(
        train=[Example("relabelled", "new"), Example("fresh", "x")],
        holdout=[Example("held", "y")],
    )
    kept = [Example("relabelled", "old"), Example("held", "y"), Example("kept", "x"), Example("fresh", "x")]
    merged = merge_training_set(snapshot, kept)
    assert merged == [Example("relabelled", "new"), Example("fresh", "x"), Example("kept", "x")]


def test_score_probabilities_adds_ece_and_log_loss() -> None:
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    truth = ["a", "b", "b"]
    got = score_probabilities(["a", "b"], probabilities, truth)
    assert {k: got[k] for k in ("macro_f1", "accuracy")} == score(truth, ["a", "b", "a"])
    assert got["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
    # 0.9 right, 0.8 right, 0.6 wrong: each its own bin.
    assert got["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)


def test_the_gate_records_ece_and_log_loss_and_decides_without_them() -> None:
    scores = _scores(0.5, 0.8)
    plain = gate(scores, min_improvement=0.0, trusted=False)
    assert plain.reason == "held-out macro-F1 +0.3000"
    scores["champion"]["holdout"].update(ece=0.25, log_loss=0.9)
    scores["challenger"]["holdout"].update(ece=0.5, log_loss=1.5)  # worse calibrated: still promoted
    decision = gate(scores, min_improvement=0.0, trusted=False)
    assert decision.promote
    assert (
        decision.reason
        == "held-out macro-F1 +0.3000 (holdout ece 0.2500 -> 0.5000; holdout log-loss 0.9000 -> 1.5000)"
    )
    rejected = _scores(0.7, 0.7, trusted=(0.9, 0.6))
    rejected["champion"]["trusted"]["ece"], rejected["challenger"]["trusted"]["ece"] = 0.1, 0.05
    assert calibration_note(rejected) == " (trusted ece 0.1000 -> 0.0500)"
    assert gate(rejected, min_improvement=0.0, trusted=True).reason.endswith(calibration_note(rejected))
