"""Model directories: setfit's layout both ways, the restricted head reader, the safe head."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sentence_transformers import SentenceTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from stream_classifier.errors import ModelError, UnsafeModelError
from stream_classifier.model.format import (
    SAFE_HEAD_JSON,
    SAFE_HEAD_TENSORS,
    SETFIT_CONFIG,
    SETFIT_HEAD,
    load_head,
    load_model,
    save_model,
)
from stream_classifier.model.runtime import ModelRuntime
from tests.fixtures.models import TRAIN_EXAMPLES

TEXTS = [e.text for e in TRAIN_EXAMPLES]
LABELS = [e.label for e in TRAIN_EXAMPLES]


def setfit_saved_dir(body_path: Path, target: Path, head: object, config: dict[str, object] | None) -> Path:
    """A directory exactly as setfit 1.x saves one: body files, config_setfit.json, model_head.pkl."""
    body = SentenceTransformer(str(body_path), device="cpu")
    body.save(str(target))
    if config is not None:
        (target / SETFIT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    joblib.dump(head, target / SETFIT_HEAD)
    return target


def setfit_predict_proba(directory: Path, texts: list[str]) -> np.ndarray:
    """What setfit's SetFitModel.predict_proba computes for a directory: head(body.encode)."""
    config = json.loads((directory / SETFIT_CONFIG).read_text())
    body = SentenceTransformer(str(directory), device="cpu")
    embeddings = body.encode(texts, normalize_embeddings=config["normalize_embeddings"])
    return joblib.load(directory / SETFIT_HEAD).predict_proba(embeddings)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def body_embeddings(tiny_body_path: Path) -> np.ndarray:
    return SentenceTransformer(str(tiny_body_path), device="cpu").encode(TEXTS)  # type: ignore[no-any-return]


@pytest.mark.parametrize("wrapper", ["plain", "ovr"])
def test_loads_a_setfit_saved_directory(
    tiny_body_path: Path, tmp_path: Path, body_embeddings: np.ndarray, wrapper: str
) -> None:
    labels = sorted(set(LABELS))
    y = np.array([labels.index(label) for label in LABELS])
    head = LogisticRegression() if wrapper == "plain" else OneVsRestClassifier(LogisticRegression())
    head.fit(body_embeddings, y)
    config = {"normalize_embeddings": False, "labels": labels}
    directory = setfit_saved_dir(tiny_body_path, tmp_path / "setfit", head, config)

    bundle = load_model(directory)
    assert bundle.labels == labels
    assert bundle.metadata.version.startswith("setfit-")
    runtime = ModelRuntime(bundle, device="cpu", precision="fp32")
    np.testing.assert_allclose(runtime.predict_proba(TEXTS), head.predict_proba(body_embeddings), atol=1e-5)


def test_setfit_directory_with_string_classes_and_no_labels(
    tiny_body_path: Path, tmp_path: Path, body_embeddings: np.ndarray
) -> None:
    head = LogisticRegression().fit(body_embeddings, LABELS)
    directory = setfit_saved_dir(tiny_body_path, tmp_path / "setfit", head, {"normalize_embeddings": True})
    loaded, normalize = load_head(directory)
    assert normalize is True
    assert loaded.classes == sorted(set(LABELS))


def test_round_trip_keeps_probabilities_metadata_and_examples(tiny_model_dir: Path, tmp_path: Path) -> None:
    bundle = load_model(tiny_model_dir)
    again = load_model(save_model(bundle, tmp_path / "copy"))
    assert again.metadata == bundle.metadata
    assert again.examples == bundle.examples == TRAIN_EXAMPLES
    assert again.labels == ["billing", "shipping", "tech"]
    first = ModelRuntime(bundle, device="cpu").predict_proba(TEXTS)
    np.testing.assert_allclose(ModelRuntime(again, device="cpu").predict_proba(TEXTS), first, atol=1e-6)


def test_saved_directory_is_what_setfit_reads(tiny_model_dir: Path) -> None:
    """Our save, read back the way setfit 1.x reads it, gives our probabilities (±1e-4)."""
    config = json.loads((tiny_model_dir / SETFIT_CONFIG).read_text())
    assert config["labels"] == ["billing", "shipping", "tech"]
    assert list(joblib.load(tiny_model_dir / SETFIT_HEAD).classes_) == [0, 1, 2]
    ours = ModelRuntime.load(tiny_model_dir, device="cpu").predict_proba(TEXTS)
    np.testing.assert_allclose(setfit_predict_proba(tiny_model_dir, TEXTS), ours, atol=1e-4)
    metadata = json.loads((tiny_model_dir / "model_metadata.json").read_text())
    assert {"version", "created_at", "base_model", "labels", "training_data", "metrics"} <= metadata.keys()
    assert metadata["training_data"]["n"] == len(TRAIN_EXAMPLES)
    assert len(metadata["training_data"]["sha256"]) == 64


def _copy(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / "m"))


def test_safe_head_is_preferred_and_pickle_not_needed(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_model_dir, tmp_path)
    expected, _ = load_head(directory)
    (directory / SETFIT_HEAD).unlink()
    head, _ = load_head(directory)
    np.testing.assert_array_equal(head.coef, expected.coef)


def test_a_replaced_pickle_wins_over_a_stale_safe_head(
    tiny_model_dir: Path, tmp_path: Path, body_embeddings: np.ndarray
) -> None:
    directory = _copy(tiny_model_dir, tmp_path)
    labels = ["billing", "shipping", "tech"]
    replacement = LogisticRegression(C=0.01).fit(body_embeddings, [labels.index(x) for x in LABELS])
    joblib.dump(replacement, directory / SETFIT_HEAD)
    head, _ = load_head(directory)
    np.testing.assert_allclose(head.coef, replacement.coef_)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_cannot_run_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_model_dir, tmp_path)
    for name in (SAFE_HEAD_JSON, SAFE_HEAD_TENSORS):
        (directory / name).unlink()
    marker = tmp_path / "pwned"
    joblib.dump(_Exploit(marker), directory / SETFIT_HEAD)
    with pytest.raises(UnsafeModelError, match="--trusted"):
        load_model(directory)
    assert not marker.exists()


def test_hostile_object_array_inside_a_joblib_head_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """joblib stores object arrays as a nested pickle: that stream is restricted too."""
    directory = _copy(tiny_model_dir, tmp_path)
    (directory / SAFE_HEAD_JSON).unlink()
    marker = tmp_path / "pwned"
    head = joblib.load(directory / SETFIT_HEAD)
    head.classes_ = np.array([_Exploit(marker), 1, 2], dtype=object)
    joblib.dump(head, directory / SETFIT_HEAD)
    with pytest.raises(UnsafeModelError):
        load_head(directory)
    assert not marker.exists()


def test_unusual_but_legitimate_pickle_needs_trust(
    tiny_body_path: Path, tmp_path: Path, body_embeddings: np.ndarray
) -> None:
    head = LogisticRegression(random_state=np.random.RandomState(0)).fit(body_embeddings, LABELS)
    directory = setfit_saved_dir(tiny_body_path, tmp_path / "s", head, {"normalize_embeddings": False})
    with pytest.raises(UnsafeModelError, match="can run arbitrary code"):
        load_head(directory)
    trusted, _ = load_head(directory, trusted=True)
    np.testing.assert_allclose(trusted.coef, head.coef_)


def test_setfit_differentiable_head_gets_a_conversion_hint(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_model_dir, tmp_path)
    (directory / SAFE_HEAD_JSON).unlink()
    stream = io.BytesIO()
    stream.write(b"\x80\x04csetfit.modeling\nSetFitHead\n)\x81}b.")  # GLOBAL, NEWOBJ, BUILD
    (directory / SETFIT_HEAD).write_bytes(stream.getvalue())
    for trusted in (False, True):
        with pytest.raises(ModelError, match="SetFitHead") as caught:
            load_head(directory, trusted=trusted)
        assert "LogisticRegression" in str(caught.value)


def test_corrupt_and_missing_heads(tiny_model_dir: Path, tmp_path: Path, tiny_body_path: Path) -> None:
    directory = _copy(tiny_model_dir, tmp_path)
    (directory / SAFE_HEAD_JSON).unlink()
    (directory / SETFIT_HEAD).write_bytes(pickle.dumps([1, 2])[:5])
    with pytest.raises(ModelError, match="not a readable joblib head pickle"):
        load_head(directory)
    with pytest.raises(ModelError, match="no classification head"):
        load_model(tiny_body_path)
    with pytest.raises(ModelError, match="no such model directory"):
        load_model(tmp_path / "absent")


def test_save_refuses_a_non_empty_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    bundle = load_model(tiny_model_dir)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        save_model(bundle, target)
    assert (target / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


# --------------------------------------------------------------------------- hostile head directories


def _safe_head_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy whose head is read from head.json + head.safetensors (no pickle beside them)."""
    directory = _copy(tiny_model_dir, tmp_path)
    (directory / SETFIT_HEAD).unlink()
    return directory


def _edit_spec(directory: Path, **changes: object) -> None:
    spec = json.loads((directory / SAFE_HEAD_JSON).read_text())
    spec.update(changes)
    (directory / SAFE_HEAD_JSON).write_text(json.dumps(spec), encoding="utf-8")


def _edit_tensors(directory: Path, **changes: np.ndarray | None) -> None:
    tensors = load_file(str(directory / SAFE_HEAD_TENSORS))
    tensors.update(changes)
    save_file({k: v for k, v in tensors.items() if v is not None}, str(directory / SAFE_HEAD_TENSORS))


def _nan_row(directory: Path) -> None:
    coef = load_file(str(directory / SAFE_HEAD_TENSORS))["coef"].copy()
    coef[1, 3] = np.nan
    _edit_tensors(directory, coef=coef)


HOSTILE_SAFE_HEADS: dict[str, tuple[Any, str]] = {
    "NaN coef": (_nan_row, "NaN or infinite"),
    "inf intercept": (
        lambda d: _edit_tensors(d, intercept=np.array([0, np.inf, 0], dtype=np.float32)),
        "NaN",
    ),
    "no coef tensor": (lambda d: _edit_tensors(d, coef=None), "coef"),
    "coef transposed": (
        lambda d: _edit_tensors(d, coef=load_file(str(d / SAFE_HEAD_TENSORS))["coef"].T.copy()),
        "shapes do not fit",
    ),
    "corrupt tensors file": (
        lambda d: (d / SAFE_HEAD_TENSORS).write_bytes(b"\xff" * 64),
        "unreadable safe head",
    ),
    "head.json is a list": (lambda d: (d / SAFE_HEAD_JSON).write_text("[1, 2]"), "not a JSON object"),
    "head.json nested too deep": (
        lambda d: (d / SAFE_HEAD_JSON).write_text("[" * 100_000),
        "unreadable safe head",
    ),
    "surrogate class name": (
        lambda d: (d / SAFE_HEAD_JSON).write_text(
            (d / SAFE_HEAD_JSON).read_text().replace('"shipping"', '"\\ud800"'), encoding="utf-8"
        ),
        "UTF-8",
    ),
    "duplicate classes": (lambda d: _edit_spec(d, classes=["a", "a", "b"]), "not unique"),
    "over-long class name": (lambda d: _edit_spec(d, classes=["a", "b" * 201, "c"]), "over 200 characters"),
    "integer classes": (lambda d: _edit_spec(d, classes=[0, 1, 2]), "list of strings"),
    "no classes": (lambda d: _edit_spec(d, classes=None), "list of strings"),
    "two classes for three rows": (lambda d: _edit_spec(d, classes=["a", "b"]), "coefficient rows"),
    "unknown multi_class": (lambda d: _edit_spec(d, multi_class="sparsemax"), "multi_class"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SAFE_HEADS))
def test_hostile_safe_heads_are_model_errors(case: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    spoil, message = HOSTILE_SAFE_HEADS[case]
    directory = _safe_head_dir(tiny_model_dir, tmp_path)
    spoil(directory)
    with pytest.raises(ModelError, match=message) as caught:
        load_head(directory)
    assert str(directory) in str(caught.value)


def _pickle_head_dir(tiny_model_dir: Path, tmp_path: Path, head: Any, config: object) -> Path:
    directory = _copy(tiny_model_dir, tmp_path)
    for name in (SAFE_HEAD_JSON, SAFE_HEAD_TENSORS):
        (directory / name).unlink()
    joblib.dump(head, directory / SETFIT_HEAD)
    (directory / SETFIT_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"labels": ["billing", "\\ud800", "tech"]}', "UTF-8"),
        ('{"labels": "billing,shipping,tech"}', "labels"),
        ('{"labels": ["billing", 2, "tech"]}', "labels"),
        (
            '{"labels": ["billing", "shipping", "tech"], "normalize_embeddings": "false"}',
            "normalize_embeddings",
        ),
        ('["billing", "shipping", "tech"]', "not a JSON object"),
    ],
)
def test_hostile_setfit_configs_are_model_errors(
    config: str, message: str, tiny_model_dir: Path, tmp_path: Path, body_embeddings: np.ndarray
) -> None:
    labels = ["billing", "shipping", "tech"]
    head = LogisticRegression().fit(body_embeddings, [labels.index(x) for x in LABELS])
    directory = _pickle_head_dir(tiny_model_dir, tmp_path, head, {})
    (directory / SETFIT_CONFIG).write_text(config, encoding="utf-8")
    with pytest.raises(ModelError, match=message):
        load_head(directory)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_pickled_head_with_non_finite_weights_is_a_model_error(
    bad: float, tiny_model_dir: Path, tmp_path: Path, body_embeddings: np.ndarray
) -> None:
    labels = ["billing", "shipping", "tech"]
    head = LogisticRegression().fit(body_embeddings, [labels.index(x) for x in LABELS])
    head.coef_[0, 0] = bad
    directory = _pickle_head_dir(tiny_model_dir, tmp_path, head, {"labels": labels})
    for trusted in (False, True):
        with pytest.raises(ModelError, match="NaN or infinite"):
            load_head(directory, trusted=trusted)


def test_a_head_for_another_embedding_dim_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = _safe_head_dir(tiny_model_dir, tmp_path)
    _edit_tensors(directory, coef=np.ones((3, 5), dtype=np.float32))
    with pytest.raises(ModelError, match="expects 5-d embeddings"):
        load_model(directory)


@pytest.mark.parametrize("version", ["", "v" * 201, "v\\ud800"])
def test_hostile_metadata_versions_are_model_errors(
    version: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The version names a store directory and travels in every output record."""
    directory = _copy(tiny_model_dir, tmp_path)
    path = directory / "model_metadata.json"
    path.write_text(path.read_text().replace(load_model(tiny_model_dir).version, version), encoding="utf-8")
    with pytest.raises(ModelError, match="invalid metadata"):
        load_model(directory)
