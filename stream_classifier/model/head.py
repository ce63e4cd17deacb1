"""The classification head: a linear layer over sentence embeddings.

:class:`LinearHead` holds what a fitted scikit-learn ``LogisticRegression`` (optionally
wrapped in ``OneVsRestClassifier``) needs to predict: ``coef`` ``(k, d)`` — or ``(1, d)``
for a binary head —, ``intercept``, the class names in column order, and how scores become
probabilities:

- ``multinomial``: ``softmax(x @ coef.T + intercept)``; a binary head (one row) gives
  ``[1 - sigmoid(z), sigmoid(z)]``, which is the softmax of ``[0, z]``;
- ``ovr``: ``sigmoid`` per class, then each row divided by its sum (scikit-learn's
  one-vs-rest ``predict_proba`` for single-label data).

The scores are divided by the head's ``temperature`` ``T`` (fitted by
:mod:`stream_classifier.model.calibration`; 1.0 = uncalibrated) before the rule above, so a
binary head gives ``sigmoid(z / T)`` and a multinomial one ``softmax(z / T)``. ``T > 0``, so
the argmax never changes. ``thresholds`` (label -> minimum probability, fitted from
``threshold_targets``, label -> target precision) travel with the head for the serving side.

Invariants:

- at temperature 1.0, :meth:`LinearHead.predict_proba` and the module from
  :meth:`LinearHead.to_torch` equal scikit-learn's ``predict_proba`` (numpy: float64 exact
  to rounding; torch fp32 within 1e-5); :meth:`LinearHead.to_sklearn` is always the
  uncalibrated estimator (what setfit reads from ``model_head.pkl``);
- every :class:`LinearHead` is valid, whatever file it came from: ``coef`` and
  ``intercept`` are finite float64 copies of real-number arrays with consistent shapes; at
  least two class names, distinct, non-empty, UTF-8-encodable (no lone surrogates) and at
  most :data:`MAX_CLASS_NAME_CHARS` characters; ``multi_class`` one of :data:`MultiClass`;
  ``temperature`` a finite number in [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`];
  ``thresholds`` and ``threshold_targets`` keyed by class names, values finite in [0, 1].
  Anything else raises :class:`ModelError` when the head is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import LabelBinarizer

from stream_classifier.errors import ModelError

MultiClass = Literal["multinomial", "ovr"]
MAX_CLASS_NAME_CHARS = 200
"""Longest class name a head may carry, in characters (names travel in every output record)."""
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
"""Bounds on a head's temperature (far outside anything a fit on real predictions gives)."""
_FIX_LABELS = "fix the labels in config_setfit.json (or head.json), or retrain with valid label names"


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
    temperature: float = 1.0
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_targets: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        coef, intercept = _finite_floats(self.coef, "coef"), _finite_floats(self.intercept, "intercept")
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "intercept", intercept)
        if coef.ndim != 2 or 0 in coef.shape or intercept.shape != coef.shape[:1]:
            shapes = f"coef {coef.shape}, intercept {intercept.shape}"
            raise ModelError(
                f"head shapes do not fit: {shapes}; expected coef (classes, dim) and intercept (classes,)"
            )
        _check_class_names(self.classes)
        k, rows = len(self.classes), coef.shape[0]
        if rows not in ({1, k} if k == 2 else {k}):
            raise ModelError(f"head has {rows} coefficient rows for {k} classes")
        if self.multi_class not in get_args(MultiClass):
            raise ModelError(
                f"head multi_class {self.multi_class!r} is unknown: expected one of {get_args(MultiClass)}"
            )
        object.__setattr__(self, "temperature", _temperature(self.temperature))
        for name in ("thresholds", "threshold_targets"):
            object.__setattr__(self, name, _label_map(getattr(self, name), name, self.classes))

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
        """Calibrated class probabilities ``(n, k)`` in :attr:`classes` order."""
        return self.probabilities_from_scores(self.scores(embeddings))

    def probabilities_from_scores(
        self, z: NDArray[np.float64], temperature: float | None = None
    ) -> NDArray[np.float64]:
        """Probabilities from scores ``(n, rows)`` at ``temperature`` (default: the head's)."""
        t = self.temperature if temperature is None else temperature
        if t != 1.0:
            z = z / t
        if z.shape[1] == 1:
            p = _sigmoid(z[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        if self.multi_class == "multinomial":
            return _softmax(z)
        p = _sigmoid(z)
        result: NDArray[np.float64] = p / p.sum(axis=1, keepdims=True)
        return result

    def calibration_json(self) -> dict[str, Any]:
        """The head.json fields for temperature and thresholds; empty when all are defaults."""
        spec: dict[str, Any] = {}
        if self.temperature != 1.0:
            spec["temperature"] = self.temperature
        if self.thresholds:
            spec["thresholds"] = dict(self.thresholds)
        if self.threshold_targets:
            spec["threshold_targets"] = dict(self.threshold_targets)
        return spec

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
        self.temperature = head.temperature

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            z = self.linear(embeddings.float())
            if self.temperature != 1.0:
                z = z / self.temperature
            if self.binary:
                p = torch.sigmoid(z)
                return torch.cat([1.0 - p, p], dim=1)
            if self.ovr:
                p = torch.sigmoid(z)
                return p / p.sum(dim=1, keepdim=True)
            return torch.softmax(z, dim=1)


def _finite_floats(value: Any, what: str) -> NDArray[np.float64]:
    """A float64 copy of ``value``, which must be a real-number array (bool, int, float) of finite values."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot convert
        raise ModelError(f"the head's {what} is not a numeric array ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise ModelError(f"the head's {what} holds {array.dtype} values, not numbers: re-save the head")
    floats = array.astype(np.float64)
    if not np.isfinite(floats).all():
        raise ModelError(f"the head's {what} holds NaN or infinite values: retrain the model")
    return floats


def calibration_from_json(spec: dict[str, Any]) -> dict[str, Any]:
    """:class:`LinearHead` keyword arguments from head.json's calibration fields (defaults when absent).

    Values are checked when the head is built.
    """
    return {
        "temperature": spec.get("temperature", 1.0),
        "thresholds": spec.get("thresholds", {}),
        "threshold_targets": spec.get("threshold_targets", {}),
    }


def _temperature(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ModelError(f"the head's temperature {_shown(value)} is not a number: retrain or recalibrate")
    t = float(value)
    if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:  # also false for NaN
        raise ModelError(
            f"the head's temperature {t} is outside [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]: "
            "retrain or recalibrate the model"
        )
    return t


def _label_map(value: Any, what: str, classes: list[str]) -> dict[str, float]:
    """A copy of ``value`` as ``{class name: probability in [0, 1]}``."""
    if not isinstance(value, dict):
        raise ModelError(f"the head's {what} must map labels to numbers, not {type(value).__name__}")
    result: dict[str, float] = {}
    for label, number in value.items():
        if label not in classes:
            raise ModelError(f"the head's {what} name {_shown(label)}, which is not one of its classes")
        if isinstance(number, bool) or not isinstance(number, int | float | np.floating | np.integer):
            raise ModelError(f"the head's {what}[{label!r}] is {_shown(number)}, not a number")
        if not 0.0 <= float(number) <= 1.0:  # also false for NaN
            raise ModelError(f"the head's {what}[{label!r}] = {number} is outside [0, 1]")
        result[label] = float(number)
    return result


def _check_class_names(classes: Any) -> None:
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise ModelError(
            f"head class names must be a list of strings, not {type(classes).__name__}: {_FIX_LABELS}"
        )
    if len(classes) < 2:
        raise ModelError(f"head has {len(classes)} classes; a classifier needs at least two: {_FIX_LABELS}")
    for name in classes:
        if not name:
            raise ModelError(f"a head class name is empty: {_FIX_LABELS}")
        if len(name) > MAX_CLASS_NAME_CHARS:
            raise ModelError(
                f"head class name {name[:40]!r}... is over {MAX_CLASS_NAME_CHARS} characters: {_FIX_LABELS}"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ModelError(
                f"head class name {name!r} is not UTF-8 text (a lone surrogate): {_FIX_LABELS}"
            ) from None
    if len(set(classes)) != len(classes):
        raise ModelError(f"head class names are not unique: {_shown(classes)}: {_FIX_LABELS}")


_CLASS_VALUES = (str, int, float)  # bool is an int


def _names(classes: Any, class_names: list[str] | None) -> list[str]:
    """Class names for a ``classes_`` array; integer classes index ``class_names`` when given."""
    try:
        array = np.asarray(classes)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"the head's classes_ is not an array ({exc})") from None
    values = array.tolist() if array.ndim == 1 else None
    if not values or not all(isinstance(v, _CLASS_VALUES) for v in values):
        raise ModelError(f"the head's classes_ must be a 1-d array of class values, not {_shown(classes)}")
    if class_names and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if not all(0 <= v < len(class_names) for v in values):
            raise ModelError(f"head classes {values} do not index the {len(class_names)} config labels")
        return [class_names[v] for v in values]
    return [str(v) for v in values]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _required(state: dict[str, Any], key: str, owner: str) -> Any:
    value = state.get(key)
    if value is None or (key == "classes_" and np.size(value) == 0):
        raise ModelError(f"the {owner} head has no '{key}': it was never fitted, or the file is damaged")
    return value


_OVR_ESTIMATORS = "the one-vs-rest head must wrap fitted binary LogisticRegression estimators"
_LR_MULTI_CLASS = ("auto", "ovr", "multinomial", "deprecated")  # "deprecated": scikit-learn 1.5-1.7's "auto"


def _lr_multi_class(state: dict[str, Any], n_classes: int) -> MultiClass:
    """Which probability rule a LogisticRegression used (old pickles may say ``ovr``)."""
    setting = state.get("multi_class", "auto")
    if not isinstance(setting, str) or setting not in _LR_MULTI_CLASS:
        raise ModelError(
            f"the LogisticRegression head's multi_class {_shown(setting)} is unknown: "
            f"expected one of {_LR_MULTI_CLASS}"
        )
    if n_classes <= 2:
        return "multinomial"
    if setting == "ovr" or (setting in ("auto", "deprecated") and state.get("solver") == "liblinear"):
        return "ovr"
    return "multinomial"


def _state_of(estimator: Any) -> dict[str, Any]:
    state = getattr(estimator, "__dict__", None)
    if not isinstance(state, dict):
        raise ModelError(_OVR_ESTIMATORS)
    return state


def head_from_state(kind: str, state: dict[str, Any], class_names: list[str] | None) -> LinearHead:
    """Build a head from the attribute dict of a ``LogisticRegression`` or ``OneVsRestClassifier``.

    Works from plain state (no scikit-learn objects needed), which is what the restricted
    unpickler in :mod:`stream_classifier.model.format` produces; nested estimators may be
    objects exposing ``__dict__``.
    """
    if kind == "LogisticRegression":
        names = _names(_required(state, "classes_", kind), class_names)
        coef = _finite_floats(_required(state, "coef_", kind), "coef_")
        intercept = _finite_floats(_required(state, "intercept_", kind), "intercept_")
        if intercept.ndim == 0 and coef.ndim == 2:  # liblinear with fit_intercept=False leaves a scalar 0.0
            intercept = np.full(coef.shape[0], intercept)
        return LinearHead(coef, intercept, names, _lr_multi_class(state, len(names)))
    if kind == "OneVsRestClassifier":
        binarizer = state.get("label_binarizer_")
        if binarizer is not None and getattr(binarizer, "y_type_", "multiclass") == "multilabel-indicator":
            raise ModelError(
                "this head is multi-label (one-vs-rest over label sets); stream-classifier serves "
                "single-label models only"
            )
        estimators = state.get("estimators_")
        if not isinstance(estimators, list | tuple):
            raise ModelError(_OVR_ESTIMATORS)
        rows = [head_from_state("LogisticRegression", _state_of(est), None) for est in estimators]
        if not rows or any(r.coef.shape[0] != 1 for r in rows):
            raise ModelError(_OVR_ESTIMATORS)
        if len({r.dim for r in rows}) != 1:
            raise ModelError(
                f"the one-vs-rest head's estimators differ in embedding dim: {_shown([r.dim for r in rows])}"
            )
        coef = np.concatenate([r.coef for r in rows])
        intercept = np.concatenate([r.intercept for r in rows])
        names = _names(_required(state, "classes_", kind), class_names)
        if len(rows) == 1:  # a binary problem: one estimator for the positive class
            return LinearHead(coef, intercept, names, "multinomial")
        return LinearHead(coef, intercept, names, "ovr")
    raise ModelError(f"unsupported head type {kind}: expected a LogisticRegression")
