"""Calibration: temperature fitting, ece and log-loss, thresholds from target precisions,
and the calibrated head through head.json, the runtime and setfit's pickle."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import joblib
import numpy as np
import pytest

from stream_classifier.model.calibration import (
    TEMPERATURE_BOUNDS,
    calibrate,
    calibrate_from,
    calibration_scores,
    expected_calibration_error,
    fit_temperature,
    fit_thresholds,
    label_indices,
    log_loss,
    out_of_fold_scores,
)
from stream_classifier.model.format import SAFE_HEAD_JSON, SETFIT_HEAD, load_model, save_model
from stream_classifier.model.head import LinearHead
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import fit_head


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _overconfident(
    k: int, true_t: float, n: int = 20_000, seed: int = 0
) -> tuple[LinearHead, np.ndarray, np.ndarray]:
    """A head whose scores are ``true_t`` times the logits the labels were drawn from."""
    rng = np.random.default_rng(seed)
    rows = 1 if k == 2 else k
    logits = rng.normal(scale=1.5, size=(n, rows))
    if rows == 1:
        p = 1 / (1 + np.exp(-logits[:, 0]))
        truth = (rng.random(n) < p).astype(np.int64)
    else:
        cumulative = _softmax(logits).cumsum(axis=1)
        truth = (rng.random((n, 1)) > cumulative).sum(axis=1).astype(np.int64)
    head = LinearHead(np.eye(rows) * true_t, np.zeros(rows), [f"c{i}" for i in range(k)])
    return head, head.scores(logits), truth


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_a_known_temperature(k: int, true_t: float) -> None:
    head, scores, truth = _overconfident(k, true_t)
    fitted = fit_temperature(head, scores, truth)
    assert fitted == pytest.approx(true_t, rel=0.05)
    calibrated = dataclasses.replace(head, temperature=fitted)
    before = log_loss(head.probabilities_from_scores(scores), truth)
    after = log_loss(calibrated.probabilities_from_scores(scores), truth)
    assert before is not None and after is not None and after < before


def test_fit_leaves_unknown_labels_out_and_stays_in_bounds() -> None:
    head, scores, truth = _overconfident(2, 2.0, n=4_000)
    with_unknown = np.where(np.arange(len(truth)) % 3 == 0, -1, truth)
    kept = with_unknown >= 0
    assert fit_temperature(head, scores, with_unknown) == pytest.approx(
        fit_temperature(head, scores[kept], truth[kept]), rel=1e-9
    )
    assert fit_temperature(head, scores, np.full(len(truth), -1)) == 1.0
    # Perfectly separated scores: the log-loss falls all the way to the lower bound.
    separated = np.array([[-3.0], [3.0]] * 50)
    assert fit_temperature(head, separated, np.array([0, 1] * 50)) == TEMPERATURE_BOUNDS[0]
    # ... and calibrate does not use a fit the data did not settle: the head keeps T = 1.
    names = ["c0", "c1"] * 50
    assert calibrate(head, separated, names, {}, source="test").temperature == 1.0
    calibrated, summary = calibrate_from(head, separated / 2.0, names, {})  # head.scores(x) = 2x
    assert (calibrated.temperature, summary["fitted_temperature"]) == (1.0, TEMPERATURE_BOUNDS[0])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_calibration_never_changes_the_argmax(k: int) -> None:
    head, scores, truth = _overconfident(k, 3.0, n=2_000, seed=k)
    calibrated = calibrate(head, scores, [head.classes[i] for i in truth], {}, source="test")
    assert calibrated.temperature != 1.0
    np.testing.assert_array_equal(
        calibrated.probabilities_from_scores(scores).argmax(axis=1),
        head.probabilities_from_scores(scores).argmax(axis=1),
    )
    np.testing.assert_array_equal(calibrated.coef, head.coef)


def test_ece_against_a_hand_computed_case() -> None:
    # Bin (13/15, 14/15]: four at 0.9, three right -> |0.75 - 0.9| * 4/6 = 0.1.
    # Bin (9/15, 10/15]: 0.61 and 0.65, one right -> |0.5 - 0.63| * 2/6 = 0.04333...
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.61, 0.65])
    correct = np.array([True, True, True, False, True, False])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.1 + 0.13 / 3, abs=1e-12)
    # The first bin holds 0 and 1/15's neighbourhood; a confidence of 1 lands in the last.
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([False, True])) == 0.0
    assert expected_calibration_error(np.array([1.0]), np.array([False])) == 1.0
    assert expected_calibration_error(np.zeros(0), np.zeros(0, dtype=bool)) == 0.0


def test_log_loss_and_calibration_scores_by_hand() -> None:
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    truth = ["a", "a", "new"]  # "new" is not a class: wrong in ece, left out of log-loss
    scores = calibration_scores(["a", "b"], probabilities, truth)
    assert scores["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.4)) / 2)
    # Bins: 0.8 right (|1 - 0.8|), 0.6 wrong (|0 - 0.6|), 0.7 wrong (|0 - 0.7|), each 1/3.
    assert scores["ece"] == pytest.approx((0.2 + 0.6 + 0.7) / 3)
    assert log_loss(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-15))
    assert "log_loss" not in calibration_scores(["a", "b"], probabilities[:1], ["z"])
    assert label_indices(["a", "b"], ["b", "z", "a"]).tolist() == [1, -1, 0]


# ---------------------------------------------------------------------- thresholds

CLASSES = ["ham", "spam"]


def _spam(p: list[float], spam: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.array(p)
    return np.stack([1 - probs, probs], axis=1), np.array([1 if s else 0 for s in spam])


def test_threshold_is_the_smallest_probability_reaching_the_target() -> None:
    # Descending spam probabilities; the 5th (0.75) is ham; the 0.3 row is predicted ham.
    probabilities, truth = _spam(
        [0.99, 0.95, 0.9, 0.8, 0.75, 0.7, 0.65, 0.6, 0.3], [True] * 4 + [False] + [True] * 3 + [True]
    )
    fit = fit_thresholds(CLASSES, probabilities, truth, {"spam": 0.875}, min_support=4)
    # Keeping down to 0.6: 7 of 8 = 0.875 exactly reaches the target; the 0.3 row is not a spam prediction.
    assert fit.thresholds == {"spam": 0.6}
    fit = fit_thresholds(CLASSES, probabilities, truth, {"spam": 0.9}, min_support=4)
    assert fit.thresholds == {"spam": 0.8}  # 0.75 drops precision to 4/5; 7/8 < 0.9 further down
    fit = fit_thresholds(CLASSES, probabilities, truth, {"spam": 1.0}, min_support=4)
    assert fit.thresholds == {"spam": 0.8}
    assert fit_thresholds(CLASSES, probabilities, truth, {"spam": 0.0}, min_support=1).thresholds == {
        "spam": 0.6
    }


def test_threshold_support_and_unreachable_targets() -> None:
    probabilities, truth = _spam([0.99, 0.95, 0.9, 0.8, 0.75], [True] * 4 + [False])
    assert fit_thresholds(CLASSES, probabilities, truth, {"spam": 1.0}, min_support=4).thresholds == {
        "spam": 0.8
    }
    fit = fit_thresholds(CLASSES, probabilities, truth, {"spam": 1.0}, min_support=5)
    assert fit.thresholds == {}
    assert "best precision" in fit.unreachable["spam"]
    fit = fit_thresholds(CLASSES, probabilities, truth, {"spam": 0.5}, min_support=6)
    assert fit.thresholds == {} and "5 held-out predictions" in fit.unreachable["spam"]
    fit = fit_thresholds(CLASSES, probabilities, truth, {"eggs": 0.5, "ham": 0.5}, min_support=1)
    assert fit.unreachable["eggs"] == "the model has no such label"
    assert "0 held-out predictions" in fit.unreachable["ham"]


def test_a_threshold_never_cuts_between_equal_probabilities() -> None:
    # Two rows at 0.9, one right: no threshold keeps only the first of them, so the 2-row
    # precision of 1.0 is not on offer; 0.9 keeps both (2/3).
    probabilities, truth = _spam([0.95, 0.9, 0.9, 0.8], [True, True, False, True])
    fit = fit_thresholds(CLASSES, probabilities, truth, {"spam": 0.8}, min_support=2)
    assert fit.thresholds == {}
    assert fit_thresholds(CLASSES, probabilities, truth, {"spam": 0.8}, min_support=1).thresholds == {
        "spam": 0.95
    }


def test_calibrate_records_targets_and_logs_the_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    head, scores, truth = _overconfident(2, 2.0, n=2_000)
    names = [head.classes[i] for i in truth]
    with caplog.at_level(logging.INFO, logger="stream_classifier.model.calibration"):
        calibrated = calibrate(head, scores, names, {"c1": 0.8, "zz": 0.9}, source="test")
    assert set(calibrated.thresholds) == {"c1"}
    assert calibrated.threshold_targets == {"c1": 0.8}
    probabilities = calibrated.probabilities_from_scores(scores)
    kept = (probabilities.argmax(axis=1) == 1) & (probabilities[:, 1] >= calibrated.thresholds["c1"])
    assert (truth[kept] == 1).mean() >= 0.8
    events = {r.getMessage() for r in caplog.records}
    assert {"head_calibrated", "threshold_unreachable"} <= events


def test_out_of_fold_scores_come_from_heads_that_never_saw_the_row() -> None:
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c"] * 10
    x = rng.normal(size=(30, 8)) + np.repeat(np.eye(3, 8)[None] * 3, 10, axis=0).reshape(30, 8)
    full = fit_head(x, labels)
    scores = out_of_fold_scores(x, labels, fit_head, full.classes, seed=0)
    assert scores is not None and scores.shape == (30, 3)
    assert not np.allclose(scores, full.scores(x))
    assert out_of_fold_scores(x[:4], ["a", "a", "a", "b"], fit_head, ["a", "b"], 0) is None


# ---------------------------------------------------------------------- the directory


def test_a_calibrated_directory_round_trips_and_setfit_reads_it_uncalibrated(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bundle = load_model(tiny_model_dir)
    plain = bundle.head
    label = plain.classes[0]
    bundle.head = dataclasses.replace(
        plain, temperature=2.5, thresholds={label: 0.7}, threshold_targets={label: 0.9}
    )
    saved = save_model(bundle, tmp_path / "calibrated")
    spec = json.loads((saved / SAFE_HEAD_JSON).read_text())
    assert (spec["temperature"], spec["thresholds"], spec["threshold_targets"]) == (
        2.5,
        {label: 0.7},
        {label: 0.9},
    )
    loaded = load_model(saved)
    assert (loaded.head.temperature, loaded.head.thresholds) == (2.5, {label: 0.7})
    assert loaded.head.threshold_targets == {label: 0.9}

    texts = ["refund my invoice", "parcel late", "app crashes", "hello"]
    runtime = ModelRuntime(loaded, device="cpu", precision="fp32")
    assert runtime.thresholds == {label: 0.7}
    embeddings = runtime.embed(texts)
    served = runtime.predict_proba(texts)
    np.testing.assert_allclose(served, loaded.head.predict_proba(embeddings), atol=1e-5)
    uncalibrated = plain.predict_proba(embeddings)
    assert not np.allclose(served, uncalibrated, atol=1e-4)
    np.testing.assert_array_equal(served.argmax(axis=1), uncalibrated.argmax(axis=1))
    # model_head.pkl is setfit's plain LogisticRegression: the uncalibrated coefficients.
    pickled = joblib.load(saved / SETFIT_HEAD)
    np.testing.assert_array_equal(pickled.coef_, plain.coef)
    np.testing.assert_allclose(pickled.predict_proba(embeddings), uncalibrated, atol=1e-12)


def test_a_directory_without_calibration_loads_and_saves_as_before(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = json.loads((tiny_model_dir / SAFE_HEAD_JSON).read_text())
    assert not {"temperature", "thresholds", "threshold_targets"} & set(before)
    bundle = load_model(tiny_model_dir)
    assert (bundle.head.temperature, bundle.head.thresholds, bundle.head.threshold_targets) == (1.0, {}, {})
    assert ModelRuntime(bundle, device="cpu").thresholds == {}
    again = json.loads((save_model(bundle, tmp_path / "again") / SAFE_HEAD_JSON).read_text())
    assert set(again) == set(before)


def test_a_replaced_pickle_drops_the_calibration_with_the_stale_safe_head(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bundle = load_model(tiny_model_dir)
    bundle.head = dataclasses.replace(bundle.head, temperature=3.0)
    saved = save_model(bundle, tmp_path / "calibrated")
    joblib.dump(joblib.load(saved / SETFIT_HEAD), saved / SETFIT_HEAD, compress=3)  # new bytes
    assert load_model(saved).head.temperature == 1.0  # the temperature was fitted for the old head


@pytest.mark.parametrize("kind", ["binary", "multinomial", "ovr"])
def test_the_fit_objective_is_the_log_loss_of_the_published_probabilities(kind: str) -> None:
    from stream_classifier.model.calibration import _log_probabilities

    rng = np.random.default_rng(3)
    rows = 1 if kind == "binary" else 3
    head = LinearHead(rng.normal(size=(rows, 4)), rng.normal(size=rows), ["a", "b", "c"][: max(2, rows)],
                      "ovr" if kind == "ovr" else "multinomial")  # fmt: skip
    z = head.scores(rng.normal(size=(50, 4)) * 3)
    for t in (0.3, 1.0, 4.0):
        np.testing.assert_allclose(
            np.exp(_log_probabilities(head, z, t)),
            head.probabilities_from_scores(z, t),
            rtol=1e-12,
            atol=1e-15,
        )
