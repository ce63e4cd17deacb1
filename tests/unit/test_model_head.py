"""Exactness of the head conversion: numpy and torch heads against sklearn's predict_proba."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from stream_classifier.errors import ModelError
from stream_classifier.model.head import (
    MAX_CLASS_NAME_CHARS,
    LinearHead,
    calibration_from_json,
    head_from_state,
)


def _data(k: int, n: int = 60, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2
    y = np.arange(n) % k
    return centers[y] + rng.normal(size=(n, d)), y


SKLEARN_HEADS = {
    "binary": LogisticRegression,
    "multinomial": lambda: LogisticRegression(C=0.5),
    "ovr": lambda: OneVsRestClassifier(LogisticRegression()),
    "ovr-binary": lambda: OneVsRestClassifier(LogisticRegression()),
}


@pytest.mark.parametrize("kind", list(SKLEARN_HEADS))
@pytest.mark.parametrize("string_classes", [False, True])
def test_numpy_and_torch_heads_equal_sklearn(kind: str, string_classes: bool) -> None:
    k = 2 if kind in {"binary", "ovr-binary"} else 4
    x, y = _data(k)
    target = np.array([f"c{v}" for v in y]) if string_classes else y
    model = SKLEARN_HEADS[kind]().fit(x, target)
    names = None if string_classes else [f"name{i}" for i in range(k)]
    head = LinearHead.from_sklearn(model, names)
    expected = model.predict_proba(x)

    assert head.classes == ([f"c{i}" for i in range(k)] if string_classes else names)
    np.testing.assert_allclose(head.predict_proba(x), expected, rtol=0, atol=1e-12)
    module = head.to_torch("cpu")
    with torch.inference_mode():
        got = module(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(SKLEARN_HEADS))
def test_to_sklearn_round_trip(kind: str) -> None:
    k = 2 if kind in {"binary", "ovr-binary"} else 3
    x, y = _data(k)
    model = SKLEARN_HEADS[kind]().fit(x, y)
    head = LinearHead.from_sklearn(model, ["a", "b", "c"][:k])
    rebuilt = head.to_sklearn(np.arange(k))
    np.testing.assert_allclose(rebuilt.predict_proba(x), model.predict_proba(x), rtol=0, atol=1e-12)
    assert list(rebuilt.classes_) == list(range(k))
    assert LinearHead.from_sklearn(rebuilt, head.classes).classes == head.classes


def test_legacy_ovr_logistic_regression_state() -> None:
    """Pickles from scikit-learn < 1.7 may hold multi_class='ovr': sigmoid per class, normalised."""
    x, y = _data(3)
    ovr = OneVsRestClassifier(LogisticRegression()).fit(x, y)
    coef = np.concatenate([e.coef_ for e in ovr.estimators_])
    intercept = np.concatenate([e.intercept_ for e in ovr.estimators_])
    state = {"classes_": np.arange(3), "coef_": coef, "intercept_": intercept, "multi_class": "ovr"}
    head = head_from_state("LogisticRegression", state, ["a", "b", "c"])
    assert head.multi_class == "ovr"
    np.testing.assert_allclose(head.predict_proba(x), ovr.predict_proba(x), atol=1e-12)


def test_torch_head_ignores_autocast() -> None:
    x, y = _data(3)
    model = LogisticRegression().fit(x, y)
    module = LinearHead.from_sklearn(model).to_torch()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(torch.as_tensor(x, dtype=torch.bfloat16))
    assert got.dtype == torch.float32


def test_unfitted_and_inconsistent_heads_are_model_errors() -> None:
    with pytest.raises(ModelError, match="never fitted"):
        LinearHead.from_sklearn(LogisticRegression())
    with pytest.raises(ModelError, match="coefficient rows"):
        LinearHead(np.zeros((3, 4)), np.zeros(3), ["a", "b"])
    with pytest.raises(ModelError, match="unsupported head type"):
        LinearHead.from_sklearn(object())


# --------------------------------------------------------------------------- hostile heads

_COEF = np.ones((3, 4))
_INTERCEPT = np.zeros(3)
_NAMES = ["a", "b", "c"]


def _lr(**changes: object) -> dict[str, object]:
    """A fitted three-class LogisticRegression's state, with ``changes`` applied (None deletes)."""
    state: dict[str, object] = {"classes_": np.arange(3), "coef_": _COEF, "intercept_": _INTERCEPT}
    state.update(changes)
    return {key: value for key, value in state.items() if value is not None}


HOSTILE_LR_STATES: dict[str, tuple[dict[str, object], str]] = {
    "nan coef": (_lr(coef_=np.where(np.eye(3, 4) > 0, np.nan, 1.0)), "NaN or infinite"),
    "inf coef": (_lr(coef_=np.full((3, 4), np.inf)), "NaN or infinite"),
    "nan intercept": (_lr(intercept_=np.array([0.0, np.nan, 0.0])), "NaN or infinite"),
    "-inf intercept": (_lr(intercept_=np.array([0.0, 0.0, -np.inf])), "NaN or infinite"),
    "nan scalar intercept": (_lr(intercept_=float("nan")), "NaN or infinite"),
    "1-d coef": (_lr(coef_=np.ones(4)), "shapes do not fit"),
    "3-d coef": (_lr(coef_=np.ones((3, 4, 1))), "shapes do not fit"),
    "0-d coef": (_lr(coef_=1.0), "shapes do not fit"),
    "no embedding columns": (_lr(coef_=np.ones((3, 0))), "shapes do not fit"),
    "coef rows do not match classes": (
        _lr(coef_=np.ones((2, 4)), intercept_=np.zeros(2)),
        "coefficient rows",
    ),
    "intercept too short": (_lr(intercept_=np.zeros(2)), "shapes do not fit"),
    "intercept 2-d": (_lr(intercept_=np.zeros((3, 1))), "shapes do not fit"),
    "string coef": (_lr(coef_=np.full((3, 4), "1.5")), "not numbers"),
    "object coef": (_lr(coef_=np.full((3, 4), None, dtype=object)), "not numbers"),
    "complex coef": (_lr(coef_=np.ones((3, 4), dtype=complex)), "not numbers"),
    "ragged coef": (_lr(coef_=[[1.0, 2.0], [3.0]]), "not a numeric array"),
    "a dict as coef": (_lr(coef_={"a": 1}), "not numbers"),
    "no coef_": (_lr(coef_=None), "no 'coef_'"),
    "no intercept_": (_lr(intercept_=None), "no 'intercept_'"),
    "no classes_": (_lr(classes_=None), "no 'classes_'"),
    "0 classes": (_lr(classes_=np.array([], dtype=int)), "no 'classes_'"),
    "1 class": (_lr(classes_=np.array([0]), coef_=np.ones((1, 4)), intercept_=np.zeros(1)), "at least two"),
    "2-d classes_": (_lr(classes_=np.arange(3).reshape(3, 1)), "classes_"),
    "objects as classes_": (_lr(classes_=np.array([object(), object(), object()])), "classes_"),
    "duplicate classes": (_lr(classes_=np.array(["x", "x", "y"])), "not unique"),
    "surrogate class name": (_lr(classes_=np.array(["a", "\ud800", "c"])), "UTF-8"),
    "over-long class name": (_lr(classes_=np.array(["a", "b" * 201, "c"])), "over 200 characters"),
    "empty class name": (_lr(classes_=np.array(["a", "", "c"])), "empty"),
    "unknown multi_class": (_lr(multi_class="crammer_singer"), "multi_class"),
    "non-string multi_class": (_lr(multi_class=["ovr"]), "multi_class"),
    "classes do not index the labels": (_lr(classes_=np.array([0, 1, 7])), "do not index"),
}


@pytest.mark.parametrize("case", list(HOSTILE_LR_STATES))
def test_hostile_logistic_regression_states_are_model_errors(case: str) -> None:
    state, message = HOSTILE_LR_STATES[case]
    with pytest.raises(ModelError, match=message):
        head_from_state("LogisticRegression", state, _NAMES)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "\udcff", "c"], "UTF-8"),
        (["a", "a", "c"], "not unique"),
        (["a", "é" * 201, "c"], "over 200 characters"),
        (["a", "", "c"], "empty"),
    ],
)
def test_hostile_config_labels_are_model_errors(names: list[str], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        head_from_state("LogisticRegression", _lr(), names)


def test_class_names_at_the_bound_load() -> None:
    names = ["a", "é" * MAX_CLASS_NAME_CHARS, "\U0001f600"]
    assert head_from_state("LogisticRegression", _lr(), names).classes == names


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"coef": np.array([[np.nan] * 4] * 3)}, "NaN or infinite"),
        ({"intercept": np.array([np.inf, 0, 0])}, "NaN or infinite"),
        ({"coef": np.ones((3, 4), dtype="U3")}, "not numbers"),
        ({"classes": ["a", "b", 3]}, "strings"),
        ({"classes": "abc"}, "strings"),
        ({"classes": []}, "at least two"),
        ({"multi_class": "softmax"}, "multi_class"),
        ({"multi_class": None}, "multi_class"),
    ],
)
def test_linear_head_refuses_hostile_fields(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"coef": _COEF, "intercept": _INTERCEPT, "classes": _NAMES}
    fields.update(changes)
    with pytest.raises(ModelError, match=message):
        LinearHead(**fields)  # type: ignore[arg-type]


def test_linear_head_keeps_float64_copies() -> None:
    coef = np.ones((3, 4), dtype=np.float32)
    head = LinearHead(coef, np.zeros(3, dtype=np.int64), _NAMES)
    assert head.coef.dtype == head.intercept.dtype == np.float64
    coef[0, 0] = 7.0
    assert head.coef[0, 0] == 1.0


class _Estimator:
    def __init__(self, **state: object) -> None:
        self.__dict__.update(state)


def _binary(dim: int = 4) -> _Estimator:
    return _Estimator(classes_=np.arange(2), coef_=np.ones((1, dim)), intercept_=np.zeros(1))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"classes_": np.arange(3)}, "fitted binary"),
        ({"classes_": np.arange(3), "estimators_": np.array([1, 2, 3])}, "fitted binary"),
        ({"classes_": np.arange(3), "estimators_": 3}, "fitted binary"),
        ({"classes_": np.arange(3), "estimators_": [_binary(), 5, _binary()]}, "fitted binary"),
        ({"classes_": np.arange(3), "estimators_": [_binary(), _binary(5), _binary()]}, "embedding dim"),
        ({"classes_": np.arange(2), "estimators_": [_binary(), _binary(), _binary()]}, "coefficient rows"),
        (
            {
                "classes_": np.arange(3),
                "estimators_": [_binary(), _binary(), _Estimator(coef_=np.ones((1, 4)))],
            },
            "no 'classes_'",
        ),
    ],
)
def test_hostile_one_vs_rest_states_are_model_errors(state: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        head_from_state("OneVsRestClassifier", state, _NAMES)


# ---------------------------------------------------------------------- temperature and thresholds


@pytest.mark.parametrize("kind", list(SKLEARN_HEADS))
@pytest.mark.parametrize("temperature", [0.25, 3.0])
def test_temperature_divides_the_scores_and_keeps_the_argmax(kind: str, temperature: float) -> None:
    k = 2 if kind in {"binary", "ovr-binary"} else 4
    x, y = _data(k)
    model = SKLEARN_HEADS[kind]().fit(x, y)
    plain = LinearHead.from_sklearn(model, [f"n{i}" for i in range(k)])
    head = dataclasses.replace(plain, temperature=temperature)
    z = plain.scores(x) / temperature
    if z.shape[1] == 1:
        expected = np.stack([1 / (1 + np.exp(z[:, 0])), 1 / (1 + np.exp(-z[:, 0]))], axis=1)
    elif plain.multi_class == "multinomial":
        expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    else:
        sig = 1 / (1 + np.exp(-z))
        expected = sig / sig.sum(axis=1, keepdims=True)
    got = head.predict_proba(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert not np.allclose(got, plain.predict_proba(x), atol=1e-6)
    np.testing.assert_array_equal(got.argmax(axis=1), plain.predict_proba(x).argmax(axis=1))
    with torch.inference_mode():
        torch_got = head.to_torch("cpu")(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(torch_got, expected, rtol=0, atol=1e-5)
    # setfit reads the uncalibrated estimator: same coefficients, sklearn's probabilities.
    np.testing.assert_allclose(head.to_sklearn().predict_proba(x), model.predict_proba(x), atol=1e-12)


def test_a_head_without_calibration_writes_no_calibration_fields() -> None:
    head = LinearHead(_COEF, _INTERCEPT, _NAMES)
    assert (head.temperature, head.thresholds, head.threshold_targets) == (1.0, {}, {})
    assert head.calibration_json() == {}
    rebuilt = LinearHead(_COEF, _INTERCEPT, _NAMES, **calibration_from_json({"format_version": 1}))
    assert (rebuilt.temperature, rebuilt.thresholds, rebuilt.threshold_targets) == (1.0, {}, {})


def test_calibration_fields_round_trip_through_json() -> None:
    head = LinearHead(
        _COEF, _INTERCEPT, _NAMES, temperature=1.7, thresholds={"a": 0.8}, threshold_targets={"a": 0.95}
    )
    spec = json.loads(json.dumps(head.calibration_json()))
    assert spec == {"temperature": 1.7, "thresholds": {"a": 0.8}, "threshold_targets": {"a": 0.95}}
    rebuilt = LinearHead(_COEF, _INTERCEPT, _NAMES, **calibration_from_json(spec))
    assert (rebuilt.temperature, rebuilt.thresholds, rebuilt.threshold_targets) == (
        1.7,
        {"a": 0.8},
        {"a": 0.95},
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": 0.0}, "outside"),
        ({"temperature": -1.0}, "outside"),
        ({"temperature": float("nan")}, "outside"),
        ({"temperature": float("inf")}, "outside"),
        ({"temperature": "2"}, "not a number"),
        ({"temperature": True}, "not a number"),
        ({"thresholds": {"z": 0.5}}, "not one of its classes"),
        ({"thresholds": {"a": 1.5}}, "outside"),
        ({"thresholds": {"a": float("nan")}}, "outside"),
        ({"thresholds": {"a": "0.5"}}, "not a number"),
        ({"thresholds": [0.5]}, "must map labels"),
        ({"threshold_targets": {"b": -0.1}}, "outside"),
    ],
)
def test_hostile_calibration_fields_are_model_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        LinearHead(_COEF, _INTERCEPT, _NAMES, **changes)  # type: ignore[arg-type]
