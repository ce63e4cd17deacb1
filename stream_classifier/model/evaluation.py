"""Classification metrics of a model on labelled examples (what ``eval`` prints).

Macro F1 averages over the union of true and predicted labels, so a label the model does
not know (a label set that grew) counts against it rather than disappearing. ``ece`` and
``log_loss`` are those of the model's published (calibrated) probabilities
(:func:`stream_classifier.model.calibration.calibration_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from stream_classifier.model.calibration import calibration_scores
from stream_classifier.model.examples import Example
from stream_classifier.model.runtime import ModelRuntime


def classification_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """``accuracy``, ``macro_f1``, ``n`` and per-class support/predicted/precision/recall/f1."""
    if len(truth) != len(predicted):
        raise ValueError("truth and predictions differ in length")
    labels = sorted(set(truth) | set(predicted))
    n = len(truth)
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    if not n:
        return {"n": 0, "accuracy": 0.0, "macro_f1": 0.0, "per_class": {}}
    precision, recall, f1, support = precision_recall_fscore_support(
        list(truth), list(predicted), labels=labels, zero_division=0
    )
    per_class = {
        label: {
            "n": int(support[i]),
            "predicted": sum(p == label for p in predicted),
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
        }
        for i, label in enumerate(labels)
    }
    return {
        "n": n,
        "accuracy": round(correct / n, 6),
        "macro_f1": round(float(f1.mean()), 6),
        "per_class": per_class,
    }


def evaluate(runtime: ModelRuntime, examples: Sequence[Example], batch_size: int = 256) -> dict[str, Any]:
    """Metrics of ``runtime`` on ``examples`` (labels the model lacks are counted as wrong):
    :func:`classification_metrics`, ``ece``, ``log_loss`` (over the examples whose label the
    model knows; absent when none does) and ``unknown_labels``."""
    texts = [e.text for e in examples]
    truth = [e.label for e in examples]
    parts = [runtime.predict_proba(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    probabilities = np.concatenate(parts) if parts else np.zeros((0, len(runtime.labels)), np.float32)
    predicted = [runtime.labels[i] for i in probabilities.argmax(axis=1)]
    metrics = classification_metrics(truth, predicted)
    metrics.update(
        {
            key: round(value, 6)
            for key, value in calibration_scores(runtime.labels, probabilities, truth).items()
        }
    )
    metrics["unknown_labels"] = sorted(set(truth) - set(runtime.labels))
    return metrics
