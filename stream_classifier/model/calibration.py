"""Calibration: a head's temperature, its calibration scores and thresholds from target precisions.

- :func:`fit_temperature` picks the ``T`` that minimises the mean log-loss of
  ``head.probabilities_from_scores(z, T)`` on held-out scores ``z``: a golden-section search
  on ``log T`` over :data:`TEMPERATURE_BOUNDS` (the log-loss of a binary or multinomial
  head is convex in ``1 / T``, so unimodal in ``log T``). ``T > 0`` divides every score
  alike, so the argmax never changes. :func:`calibrate` does not use a fit that ends on a
  bound (the head keeps ``T = 1``).
- :func:`calibration_scores`: ``ece``, the expected calibration error over
  :data:`ECE_BINS` equal-width bins of the top-label confidence (bin ``b`` holds
  confidences in ``(b/15, (b+1)/15]``, the first bin also 0), the sum over bins of
  ``|accuracy - mean confidence|`` weighted by the bin's share of the examples; and
  ``log_loss``, the mean ``-ln p(true label)`` (probabilities clipped at
  :data:`LOG_LOSS_EPSILON`) over the examples whose label the head knows (absent when none
  does). Examples with an unknown label count as wrong in ``ece``.
- :func:`fit_thresholds`: for each label with a target precision, the smallest probability
  ``t`` among the held-out examples predicted as that label such that the predictions of
  that label with probability ``>= t`` reach the target, kept only when at least
  ``min_support`` predictions remain; otherwise the label gets no threshold.
- :func:`out_of_fold_scores`: scores of every training embedding from a head fitted on the
  other folds (stratified k-fold), for calibrating without held-out data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import StratifiedKFold

from stream_classifier.model.head import LinearHead
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

ECE_BINS = 15
LOG_LOSS_EPSILON = 1e-15
TEMPERATURE_BOUNDS = (0.01, 100.0)
"""Where the temperature search looks; a fit at a bound is logged (the data did not settle it)."""
MIN_THRESHOLD_SUPPORT = 10
"""Fewest held-out predictions of a label a fitted threshold may rest on."""
CV_FOLDS = 5
_PRECISION_SLACK = 1e-12  # 0.9 must count as reached by 9 of 10 whatever the rounding
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SEARCH_STEPS = 80  # the bracket shrinks by 0.618 a step: 80 steps reach ~1e-16 of ln(1e4)

HeadFit = Callable[[NDArray[Any], list[str]], LinearHead]


def label_indices(classes: Sequence[str], truth: Sequence[str]) -> NDArray[np.int64]:
    """Each true label's column in ``classes``; -1 for a label the head does not know."""
    column = {name: i for i, name in enumerate(classes)}
    return np.array([column.get(label, -1) for label in truth], dtype=np.int64)


def log_loss(probabilities: NDArray[Any], truth: NDArray[np.int64]) -> float | None:
    """Mean ``-ln p`` of the true columns ``truth`` (entries -1 skipped); None when none is known."""
    known = truth >= 0
    if not known.any():
        return None
    p = np.asarray(probabilities, dtype=np.float64)[known, truth[known]]
    return float(-np.log(np.clip(p, LOG_LOSS_EPSILON, 1.0)).mean())


def expected_calibration_error(
    confidence: NDArray[Any], correct: NDArray[np.bool_], bins: int = ECE_BINS
) -> float:
    """ECE of top-label ``confidence`` against ``correct`` over ``bins`` equal-width bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidence.size == 0:
        return 0.0
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(index):
        members = index == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / confidence.size)


def calibration_scores(
    classes: Sequence[str], probabilities: NDArray[Any], truth: Sequence[str]
) -> dict[str, float]:
    """``ece`` and ``log_loss`` of ``probabilities`` (columns in ``classes`` order) on ``truth``."""
    columns = label_indices(classes, truth)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    top = probabilities.argmax(axis=1) if len(truth) else np.zeros(0, dtype=np.int64)
    scores = {"ece": expected_calibration_error(probabilities.max(axis=1, initial=0.0), top == columns)}
    loss = log_loss(probabilities, columns)
    if loss is not None:
        scores["log_loss"] = loss
    return scores


def fit_temperature(head: LinearHead, scores: NDArray[Any], truth: NDArray[np.int64]) -> float:
    """The temperature in :data:`TEMPERATURE_BOUNDS` minimising the log-loss of ``head`` on
    ``scores`` (``head.scores`` of held-out embeddings) with true columns ``truth``.

    Examples whose label the head does not know (-1) are left out; with none left, 1.0.
    """
    known = truth >= 0
    if not known.any():
        return 1.0
    z, columns = np.asarray(scores, dtype=np.float64)[known], truth[known]

    rows = np.arange(len(columns))

    def loss_at(t: float) -> float:
        return float(-_log_probabilities(head, z, t)[rows, columns].mean())

    def loss(log_t: float) -> float:
        return loss_at(math.exp(log_t))

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(_SEARCH_STEPS):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - _GOLDEN * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + _GOLDEN * (high - low)
            loss_b = loss(b)
    # The bounds themselves and 1.0 too: never worse than uncalibrated on the data it saw.
    candidates = (1.0, math.exp(a), math.exp(b), *TEMPERATURE_BOUNDS)
    best = min(candidates, key=loss_at)
    for bound in TEMPERATURE_BOUNDS:  # a search that ran into a bound ends on it
        if math.isclose(best, bound, rel_tol=1e-6):
            return bound
    return float(min(max(best, TEMPERATURE_BOUNDS[0]), TEMPERATURE_BOUNDS[1]))


def _log_probabilities(head: LinearHead, z: NDArray[np.float64], t: float) -> NDArray[np.float64]:
    """``ln`` of ``head.probabilities_from_scores(z, t)``, exact where the rule allows (no
    clipping, so the fit's objective does not flatten where probabilities underflow)."""
    scaled = z / t
    if z.shape[1] == 1:  # [1 - sigmoid(s), sigmoid(s)]
        return np.stack([-np.logaddexp(0.0, scaled[:, 0]), -np.logaddexp(0.0, -scaled[:, 0])], axis=1)
    if head.multi_class == "multinomial":
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        result: NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return result
    clipped: NDArray[np.float64] = np.log(np.clip(head.probabilities_from_scores(z, t), 1e-300, 1.0))
    return clipped


@dataclass(frozen=True)
class ThresholdFit:
    """Fitted thresholds, and for each label that got none, why."""

    thresholds: dict[str, float]
    unreachable: dict[str, str]


def fit_thresholds(
    classes: Sequence[str],
    probabilities: NDArray[Any],
    truth: NDArray[np.int64],
    targets: Mapping[str, float],
    min_support: int = MIN_THRESHOLD_SUPPORT,
) -> ThresholdFit:
    """Per label of ``targets``, the smallest threshold reaching its precision (module docstring)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    top = probabilities.argmax(axis=1) if len(truth) else np.zeros(0, dtype=np.int64)
    thresholds: dict[str, float] = {}
    unreachable: dict[str, str] = {}
    for label, target in targets.items():
        if label not in classes:
            unreachable[label] = "the model has no such label"
            continue
        column = list(classes).index(label)
        predicted = top == column
        p = probabilities[predicted, column]
        hit = truth[predicted] == column
        order = np.argsort(-p, kind="stable")  # descending: keeping the first j predictions
        p, hit = p[order], hit[order]
        precision = np.cumsum(hit) / np.arange(1, len(p) + 1)
        # A cut between equal probabilities is not a threshold: only the last of a run counts.
        last_of_run = np.append(p[1:] != p[:-1], True) if len(p) else np.zeros(0, dtype=bool)
        support = np.arange(1, len(p) + 1)
        ok = last_of_run & (precision >= target - _PRECISION_SLACK) & (support >= min_support)
        if ok.any():
            thresholds[label] = float(p[np.flatnonzero(ok)[-1]])
        elif len(p) < min_support:
            unreachable[label] = f"{len(p)} held-out predictions < the {min_support} a threshold needs"
        else:
            best = float(precision[support >= min_support].max())
            unreachable[label] = f"the best precision with {min_support}+ predictions is {best:.3f}"
    return ThresholdFit(thresholds, unreachable)


def out_of_fold_scores(
    embeddings: NDArray[Any], labels: Sequence[str], fit: HeadFit, classes: Sequence[str], seed: int
) -> NDArray[np.float64] | None:
    """Scores of each embedding by a head ``fit`` on the other folds; None when a label has
    fewer than 2 examples (no fold split keeps every label on both sides)."""
    labels = list(labels)
    smallest = min(labels.count(name) for name in set(labels))
    if smallest < 2:
        return None
    folds = StratifiedKFold(n_splits=min(CV_FOLDS, smallest), shuffle=True, random_state=seed)
    x = np.asarray(embeddings)
    scores: NDArray[np.float64] | None = None
    for train_rows, test_rows in folds.split(x, labels):
        head = fit(x[train_rows], [labels[i] for i in train_rows])
        if head.classes != list(classes):
            return None
        fold_scores = head.scores(x[test_rows])
        if scores is None:
            scores = np.zeros((len(labels), fold_scores.shape[1]))
        scores[test_rows] = fold_scores
    return scores


def calibrate(
    head: LinearHead,
    scores: NDArray[Any],
    truth: Sequence[str],
    targets: Mapping[str, float],
    *,
    source: str,
    min_support: int = MIN_THRESHOLD_SUPPORT,
) -> LinearHead:
    """``head`` with a temperature fitted on ``scores`` and thresholds for ``targets``.

    ``scores`` are uncalibrated scores of held-out (or out-of-fold) examples labelled
    ``truth``; ``source`` names them in the ``head_calibrated`` log event. The coefficients
    are unchanged. A fit that ends on a bound of :data:`TEMPERATURE_BOUNDS` is not used: the
    data did not settle the temperature (typically predictions that are all right by a
    margin, as out-of-fold scores over a body fine-tuned on the same examples are, where the
    log-loss only falls as ``T`` does), so the head keeps ``T = 1``, logged as a warning,
    and the thresholds are fitted on its ``T = 1`` probabilities.
    """
    columns = label_indices(head.classes, truth)
    fitted_temperature = fit_temperature(head, scores, columns)
    at_bound = fitted_temperature in TEMPERATURE_BOUNDS
    temperature = 1.0 if at_bound else fitted_temperature
    probabilities = head.probabilities_from_scores(np.asarray(scores, dtype=np.float64), temperature)
    fitted = fit_thresholds(head.classes, probabilities, columns, targets, min_support)
    for label, reason in fitted.unreachable.items():
        log_event(
            log,
            "threshold_unreachable",
            logging.WARNING,
            label=label,
            target_precision=targets[label],
            reason=reason,
            source=source,
        )
    log_event(
        log,
        "head_calibrated",
        logging.WARNING if at_bound else logging.INFO,
        temperature=round(temperature, 6),
        fitted_temperature=round(fitted_temperature, 6),
        at_bound=at_bound,
        examples=int((columns >= 0).sum()),
        source=source,
        thresholds=fitted.thresholds,
    )
    return dataclasses.replace(
        head,
        temperature=temperature,
        thresholds=fitted.thresholds,
        threshold_targets={label: float(targets[label]) for label in fitted.thresholds},
    )


def calibrate_from(
    head: LinearHead,
    embeddings: NDArray[Any],
    truth: Sequence[str],
    targets: Mapping[str, float],
    *,
    fit: HeadFit | None = None,
    seed: int = 42,
) -> tuple[LinearHead, dict[str, Any]]:
    """``head`` calibrated on labelled ``embeddings``, and a summary of the fit.

    Without ``fit`` the embeddings are held out (``source`` ``held-out``): their scores are
    ``head``'s own. With ``fit`` they are the training examples (``cross-validation``):
    scored out of fold by heads ``fit`` on the other folds; when a label has fewer than two
    examples there are no folds, and ``head`` comes back unchanged (``source`` None, a
    ``calibration_skipped`` event). The summary gives ``ece`` and ``log_loss`` before and
    after on the examples the temperature was fitted on (in-sample for the ``after``).
    """
    source = "held-out" if fit is None else "cross-validation"
    if fit is None:
        scores: NDArray[np.float64] | None = head.scores(embeddings)
    else:
        scores = out_of_fold_scores(embeddings, truth, fit, head.classes, seed)
    if scores is None:
        reason = "a label has fewer than 2 training examples: no folds to score out of"
        log_event(log, "calibration_skipped", logging.WARNING, reason=reason)
        return head, {"source": None, "reason": reason, "temperature": head.temperature}
    calibrated = calibrate(head, scores, truth, targets, source=source)
    summary = {
        "source": source,
        "examples": len(truth),
        "temperature": round(calibrated.temperature, 6),
        # The search's own result; on a bound it was not used (see calibrate).
        "fitted_temperature": round(fit_temperature(head, scores, label_indices(head.classes, truth)), 6),
        "thresholds": calibrated.thresholds,
        "before": calibration_scores(head.classes, head.probabilities_from_scores(scores, 1.0), truth),
        "after": calibration_scores(head.classes, calibrated.probabilities_from_scores(scores), truth),
    }
    return calibrated, summary
