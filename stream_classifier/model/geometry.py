"""Head geometry: a logistic-regression head blended with a nearest-centroid cosine score.

With ``mu`` the mean training embedding and ``c_k`` the unit-length mean of class ``k``'s
centred embeddings, the centroid score of ``x`` is ``c_k . (x - mu) / T``: on unit-length
embeddings (all-MiniLM-L6-v2 normalises its own), its argmax is the nearest centroid by
cosine of the centred vectors (``|x - mu|`` is the same for every class). The blend
``(1 - w) * logistic + w * centroid`` is linear in ``x``, so it folds into the head's
``coef`` and ``intercept``: the saved head is an ordinary ``LogisticRegression`` that setfit
and every reader of ours load unchanged. Centring alone would change nothing: scikit-learn
does not penalise the intercept, so a logistic head is translation-invariant.

The label-name prior adds ``w * x . n_k`` to class ``k``'s logit, ``n_k`` the unit embedding
of its cleaned name (``model/anchors.py``) by the fine-tuned body: linear in ``x`` too, it
folds into ``coef`` alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sentence_transformers import SentenceTransformer

from stream_classifier.model.anchors import AnchorDecision, clean_label
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


def _in_head_rows(head: LinearHead, per_class: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per-class scores (one row per class) as ``head`` lays them out: a binary head has one
    row, scoring class 1 against class 0."""
    return per_class[1:] - per_class[:1] if head.coef.shape[0] == 1 else per_class


def blend_centroid(
    head: LinearHead, embeddings: NDArray[Any], labels: Sequence[str], weight: float, temperature: float
) -> LinearHead:
    """``head`` with the centroid score blended in at ``weight`` (0: unchanged, 1: centroid only)."""
    if weight == 0.0:
        return head
    coef, intercept = centroid_scores(embeddings, labels, head.classes, temperature)
    coef, intercept = _in_head_rows(head, coef), _in_head_rows(head, intercept)
    return dataclasses.replace(
        head,
        coef=(1.0 - weight) * head.coef + weight * coef,
        intercept=(1.0 - weight) * head.intercept + weight * intercept,
    )


def add_label_prior(
    head: LinearHead,
    body: SentenceTransformer,
    weight: float,
    gate: AnchorDecision | None,
    notes: dict[str, object],
) -> LinearHead:
    """``head`` with the label-name prior added, unless ``gate`` (None: no gate) refuses; the
    decision goes into ``notes``."""
    if gate is not None:
        notes["label_prior_gate"] = {"zero_shot_accuracy": gate.zero_shot_accuracy, "bar": gate.bar}
    notes["label_prior"] = gate is None or gate.use
    if not notes["label_prior"]:
        return head
    names = body.encode([clean_label(c) for c in head.classes], normalize_embeddings=True)
    coef = weight * np.asarray(names, dtype=np.float64)
    return dataclasses.replace(head, coef=head.coef + _in_head_rows(head, coef))
