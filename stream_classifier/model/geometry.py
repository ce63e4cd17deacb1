"""Head geometry: a logistic-regression head blended with a nearest-centroid cosine score.

With ``mu`` the mean training embedding and ``c_k`` the unit-length mean of class ``k``'s
centred embeddings, the centroid score of ``x`` is ``c_k . (x - mu) / T``: on unit-length
embeddings (all-MiniLM-L6-v2 normalises its own), its argmax is the nearest centroid by
cosine of the centred vectors (``|x - mu|`` is the same for every class). The blend
``(1 - w) * logistic + w * centroid`` is linear in ``x``, so it folds into the head's
``coef`` and ``intercept``: the saved head is an ordinary ``LogisticRegression`` that setfit
and every reader of ours load unchanged. Centring alone would change nothing: scikit-learn
does not penalise the intercept, so a logistic head is translation-invariant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_classifier.model.head import LinearHead


def centroid_scores(
    embeddings: NDArray[Any], labels: Sequence[str], classes: Sequence[str], temperature: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(coef, intercept)`` of the centroid score, one row per class in ``classes`` order."""
    x = np.asarray(embeddings, dtype=np.float64)
    mu = x.mean(axis=0)
    y = np.asarray(list(labels))
    rows = []
    for name in classes:
        c = (x[y == name] - mu).mean(axis=0)
        rows.append(c / max(float(np.linalg.norm(c)), 1e-12))
    coef = np.stack(rows) / temperature
    return coef, -(coef @ mu)


def blend_centroid(
    head: LinearHead, embeddings: NDArray[Any], labels: Sequence[str], weight: float, temperature: float
) -> LinearHead:
    """``head`` with the centroid score blended in at ``weight`` (0: unchanged, 1: centroid only)."""
    if weight == 0.0:
        return head
    coef, intercept = centroid_scores(embeddings, labels, head.classes, temperature)
    if head.coef.shape[0] == 1:  # binary: one row scoring class 1 against class 0
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    return dataclasses.replace(
        head,
        coef=(1.0 - weight) * head.coef + weight * coef,
        intercept=(1.0 - weight) * head.intercept + weight * intercept,
    )
