"""The classification head: a linear layer over sentence embeddings.

:class:`LinearHead` holds what a fitted scikit-learn ``LogisticRegression`` (optionally
wrapped in ``OneVsRestClassifier``) needs to predict: ``coef`` ``(k, d)`` — or ``(1, d)``
for a binary head —, ``intercept``, the class names in column order, and how scores become
probabilities:

- ``multinomial``: ``softmax(x @ coef.T + intercept)``; a binary head (one row) gives
  ``[1 - sigmoid(z), sigmoid(z)]``, which is the softmax of ``[0, z]``;
- ``ovr``: ``sigmoid`` per class, then each row divided by its sum (scikit-learn's
  one-vs-rest ``predict_proba`` for single-label data).

Invariant: :meth:`LinearHead.predict_proba` and the module from :meth:`LinearHead.to_torch`
equal scikit-learn's ``predict_proba`` (numpy: float64 exact to rounding; torch fp32
within 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import LabelBinarizer

from stream_classifier.errors import ModelError

MultiClass = Literal["multinomial", "ovr"]


def _softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    shifted = z - z.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return result


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    result: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * z))
    return result


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier over embeddings; see the module docstring for the maths."""

    coef: NDArray[np.float64]
    intercept: NDArray[np.float64]
    classes: list[str]
    multi_class: MultiClass = "multinomial"

    def __post_init__(self) -> None:
        k = len(self.classes)
        rows = self.coef.shape[0]
        if self.coef.ndim != 2 or self.intercept.shape != (rows,):
            shapes = f"coef {self.coef.shape}, intercept {self.intercept.shape}"
            raise ModelError(f"head shapes do not fit: {shapes}")
        if k < 2 or rows not in ({1, k} if k == 2 else {k}):
            raise ModelError(f"head has {rows} coefficient rows for {k} classes")
        if len(set(self.classes)) != k:
            raise ModelError(f"head class names are not unique: {self.classes}")

    @property
    def dim(self) -> int:
        """Embedding dimension the head expects."""
        return int(self.coef.shape[1])

    def scores(self, embeddings: NDArray[Any]) -> NDArray[np.float64]:
        """Decision function ``x @ coef.T + intercept``, ``(n, rows)``."""
        x = np.asarray(embeddings, dtype=np.float64)
        result: NDArray[np.float64] = x @ self.coef.T + self.intercept
        return result

    def predict_proba(self, embeddings: NDArray[Any]) -> NDArray[np.float64]:
        """Class probabilities ``(n, k)`` in :attr:`classes` order."""
        z = self.scores(embeddings)
        if z.shape[1] == 1:
            p = _sigmoid(z[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        if self.multi_class == "multinomial":
            return _softmax(z)
        p = _sigmoid(z)
        result: NDArray[np.float64] = p / p.sum(axis=1, keepdims=True)
        return result

    # ------------------------------------------------------------------ scikit-learn

    @classmethod
    def from_sklearn(cls, model: Any, class_names: list[str] | None = None) -> LinearHead:
        """Build from a fitted ``LogisticRegression`` or ``OneVsRestClassifier(LogisticRegression)``.

        ``class_names`` maps integer ``classes_`` to names (setfit's ``labels``); string
        ``classes_`` are used as they are.
        """
        if isinstance(model, OneVsRestClassifier):
            return head_from_state("OneVsRestClassifier", vars(model), class_names)
        if isinstance(model, LogisticRegression):
            return head_from_state("LogisticRegression", vars(model), class_names)
        raise ModelError(f"unsupported head type {type(model).__name__}: expected a LogisticRegression")

    def to_sklearn(self, class_values: NDArray[Any] | None = None) -> Any:
        """A fitted scikit-learn estimator with the same ``predict_proba``.

        ``class_values`` becomes ``classes_`` (default: the class names); setfit saves
        integer classes ``0..k-1`` with the names in ``config_setfit.json``.
        """
        classes = np.asarray(self.classes if class_values is None else class_values)
        if self.multi_class == "multinomial" or self.coef.shape[0] == 1:
            lr = LogisticRegression()
            lr.classes_ = classes
            lr.coef_ = self.coef.copy()
            lr.intercept_ = self.intercept.copy()
            lr.n_features_in_ = self.dim
            lr.n_iter_ = np.zeros(1, dtype=np.int32)
            return lr
        estimators = []
        for row in range(self.coef.shape[0]):
            est = LogisticRegression()
            est.classes_ = np.array([0, 1])
            est.coef_ = self.coef[row : row + 1].copy()
            est.intercept_ = self.intercept[row : row + 1].copy()
            est.n_features_in_ = self.dim
            est.n_iter_ = np.zeros(1, dtype=np.int32)
            estimators.append(est)
        ovr = OneVsRestClassifier(LogisticRegression())
        binarizer = LabelBinarizer()
        binarizer.fit(classes)
        ovr.label_binarizer_ = binarizer
        ovr.estimators_ = estimators
        ovr.classes_ = binarizer.classes_
        ovr.n_features_in_ = self.dim
        return ovr

    # ------------------------------------------------------------------ torch

    def to_torch(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """A module mapping embeddings ``(n, d)`` to probabilities ``(n, k)`` on ``device``.

        It always computes in float32 (autocast is disabled inside), so AMP in the body
        does not change the head's arithmetic.
        """
        return TorchLinearHead(self).to(device)


class TorchLinearHead(torch.nn.Module):
    """Torch form of a :class:`LinearHead` (built by :meth:`LinearHead.to_torch`)."""

    def __init__(self, head: LinearHead) -> None:
        super().__init__()
        coef = torch.as_tensor(head.coef, dtype=torch.float32)
        intercept = torch.as_tensor(head.intercept, dtype=torch.float32)
        self.binary = coef.shape[0] == 1
        self.ovr = head.multi_class == "ovr" and not self.binary
        self.linear = torch.nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(coef)
            self.linear.bias.copy_(intercept)
        self.linear.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            z = self.linear(embeddings.float())
            if self.binary:
                p = torch.sigmoid(z)
                return torch.cat([1.0 - p, p], dim=1)
            if self.ovr:
                p = torch.sigmoid(z)
                return p / p.sum(dim=1, keepdim=True)
            return torch.softmax(z, dim=1)


def _names(classes: NDArray[Any], class_names: list[str] | None) -> list[str]:
    values = list(np.asarray(classes).tolist())
    if class_names and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if not all(0 <= int(v) < len(class_names) for v in values):
            raise ModelError(f"head classes {values} do not index the {len(class_names)} config labels")
        return [class_names[int(v)] for v in values]
    return [str(v) for v in values]


def _array(state: dict[str, Any], key: str, owner: str) -> NDArray[np.float64]:
    value = state.get(key)
    if value is None:
        raise ModelError(f"the {owner} head has no '{key}': it was never fitted")
    return np.asarray(value, dtype=np.float64)


def _lr_multi_class(state: dict[str, Any], n_classes: int) -> MultiClass:
    """Which probability rule a LogisticRegression used (old pickles may say ``ovr``)."""
    setting = state.get("multi_class", "auto")
    if n_classes <= 2:
        return "multinomial"
    if setting == "ovr" or (setting == "auto" and state.get("solver") == "liblinear"):
        return "ovr"
    return "multinomial"


def head_from_state(kind: str, state: dict[str, Any], class_names: list[str] | None) -> LinearHead:
    """Build a head from the attribute dict of a ``LogisticRegression`` or ``OneVsRestClassifier``.

    Works from plain state (no scikit-learn objects needed), which is what the restricted
    unpickler in :mod:`stream_classifier.model.format` produces; nested estimators may be
    objects exposing ``__dict__``.
    """
    if kind == "LogisticRegression":
        classes = np.asarray(state.get("classes_"))
        coef = _array(state, "coef_", kind)
        intercept = _array(state, "intercept_", kind).reshape(-1)
        if intercept.shape[0] != coef.shape[0]:  # fit_intercept=False leaves a scalar 0.0
            intercept = np.zeros(coef.shape[0])
        return LinearHead(coef, intercept, _names(classes, class_names), _lr_multi_class(state, classes.size))
    if kind == "OneVsRestClassifier":
        binarizer = state.get("label_binarizer_")
        if binarizer is not None and getattr(binarizer, "y_type_", "multiclass") == "multilabel-indicator":
            raise ModelError(
                "this head is multi-label (one-vs-rest over label sets); stream-classifier serves "
                "single-label models only"
            )
        estimators = state.get("estimators_") or []
        rows = [head_from_state("LogisticRegression", vars(est), None) for est in estimators]
        if not rows or any(r.coef.shape[0] != 1 for r in rows):
            raise ModelError("the one-vs-rest head must wrap fitted binary LogisticRegression estimators")
        classes = np.asarray(state.get("classes_"))
        coef = np.concatenate([r.coef for r in rows])
        intercept = np.concatenate([r.intercept for r in rows])
        names = _names(classes, class_names)
        if len(rows) == 1:  # a binary problem: one estimator for the positive class
            return LinearHead(coef, intercept, names, "multinomial")
        return LinearHead(coef, intercept, names, "ovr")
    raise ModelError(f"unsupported head type {kind}: expected a LogisticRegression")
