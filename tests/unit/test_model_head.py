"""Exactness of the head conversion: numpy and torch heads against sklearn's predict_proba."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from stream_classifier.errors import ModelError
from stream_classifier.model.head import LinearHead, head_from_state


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
