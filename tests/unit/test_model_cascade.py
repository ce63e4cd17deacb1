"""The cascade: a distilled student in front of the transformer (model/student.py, model/cascade.py).

Built once per module on the tiny random body (a real model2vec distillation of it); its
predictions mean nothing, so the tests pick bounds from the student's own confidences.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("model2vec")

from stream_classifier.errors import ModelError
from stream_classifier.model.cascade import STUDENT, TRANSFORMER, CascadeRuntime, Decided, build_cascade
from stream_classifier.model.format import load_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.student import NEVER, STUDENT_DIR, Student, fit_bound
from tests.fixtures.models import TRAIN_EXAMPLES

TEXTS = [e.text for e in TRAIN_EXAMPLES] + [
    "refund my card",
    "the parcel is lost",
    "error when I log in",
    "hello",
    "a much longer message about a payment that went through twice and a parcel that never came",
]


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and STUDENT_DIR not in path.relative_to(directory).parts
    }


@pytest.fixture(scope="module")
def built(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    model_dir = tmp_path_factory.mktemp("cascade") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    before = _hashes(model_dir)
    build_cascade(model_dir)  # the one call a promotion makes
    return model_dir, before


@pytest.fixture(scope="module")
def transformer(built: tuple[Path, dict[str, str]]) -> ModelRuntime:
    return ModelRuntime.load(built[0], device="cpu")


@pytest.fixture(scope="module")
def student(built: tuple[Path, dict[str, str]], transformer: ModelRuntime) -> Student:
    return Student.load(built[0], model_version=transformer.version)


def test_the_bound_is_the_lowest_prefix_within_the_target() -> None:
    confidence = np.array([0.99, 0.95, 0.95, 0.9, 0.8, 0.7])
    student = np.array([True, True, False, True, True, False])
    teacher = np.array([True, True, True, True, False, True])
    # Net costs from the top: 0, then the tie {0.95, 0.95} costs 1, 0.9: 1, 0.8: 0 (student right,
    # teacher wrong), 0.7: 1. With 1/6 allowed every bound passes; 0.7 is the lowest.
    assert fit_bound(confidence, student, teacher, 1 / 6, z=0.0).bound == 0.7
    # With nothing allowed the tie at 0.95 stops the search: 0.99 alone, even though 0.8 is back at 0.
    fit = fit_bound(confidence, student, teacher, 0.0, z=0.0)
    assert (fit.bound, fit.coverage, fit.loss) == (0.99, 1 / 6, 0.0)
    assert fit_bound(confidence, ~teacher, teacher, 0.0, z=0.0).bound == NEVER
    assert fit_bound(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)).bound == NEVER


def test_the_margin_counts_harms_that_gains_offset() -> None:
    # 100 rows: the 10 most confident are 5 harms and 5 gains (net 0), the rest agree.
    confidence = np.linspace(1.0, 0.01, 100)
    student = np.ones(100, bool)
    teacher = np.ones(100, bool)
    student[:10:2], teacher[1:10:2] = False, False
    assert fit_bound(confidence, student, teacher, 0.01, z=0.0).bound == 0.01
    # sqrt(10) * 1.645 / 100 = 0.052 > 0.01: the margin stops at the first harm.
    fit = fit_bound(confidence, student, teacher, 0.01)
    assert fit.bound == NEVER and fit.coverage == 0.0
    assert fit_bound(confidence, student, teacher, 0.06).bound == 0.01


def test_rows_above_the_bound_are_the_students_the_rest_exactly_the_transformers(
    transformer: ModelRuntime, student: Student
) -> None:
    own = student.predict_proba(TEXTS)
    bound = float(np.median(own.max(axis=1)))
    cascade = CascadeRuntime(transformer, student, bound=bound)
    result = cascade.predict_proba(TEXTS)
    sure = own.max(axis=1) >= bound
    assert 0 < sure.sum() < len(TEXTS)
    assert isinstance(result, Decided) and result.dtype == np.float32 and result.shape == own.shape
    assert result.decided_by == tuple(STUDENT if s else TRANSFORMER for s in sure)
    np.testing.assert_array_equal(result[sure], own[sure])
    unsure = [t for t, s in zip(TEXTS, sure, strict=True) if not s]
    np.testing.assert_array_equal(result[~sure], transformer.predict_proba(unsure))


def test_order_is_kept_whatever_the_batch_order(transformer: ModelRuntime, student: Student) -> None:
    bound = float(np.median(student.predict_proba(TEXTS).max(axis=1)))
    cascade = CascadeRuntime(transformer, student, bound=bound)
    forward = cascade.predict_proba(TEXTS)
    order = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = cascade.predict_proba([TEXTS[i] for i in order])
    assert shuffled.decided_by == tuple(forward.decided_by[i] for i in order)  # type: ignore[index]
    np.testing.assert_allclose(shuffled, forward[order], atol=1e-6)


def test_bounds_at_the_ends_give_one_model_alone(transformer: ModelRuntime, student: Student) -> None:
    never = CascadeRuntime(transformer, student, bound=NEVER).predict_proba(TEXTS)
    assert set(never.decided_by or ()) == {TRANSFORMER}
    np.testing.assert_array_equal(never, transformer.predict_proba(TEXTS))
    always = CascadeRuntime(transformer, student, bound=0.0).predict_proba(TEXTS)
    assert set(always.decided_by or ()) == {STUDENT}
    np.testing.assert_array_equal(always, student.predict_proba(TEXTS))
    empty = CascadeRuntime(transformer, student).predict_proba([])
    assert empty.shape == (0, len(transformer.labels)) and empty.decided_by == ()


def test_a_derived_array_names_no_decider(transformer: ModelRuntime, student: Student) -> None:
    result = CascadeRuntime(transformer, student, bound=0.0).predict_proba(TEXTS)
    assert result[:2].decided_by is None and result.copy().decided_by is None
    assert result.decided_by is not None and len(result.decided_by) == len(TEXTS)


def test_the_student_round_trips_and_records_its_fit(
    built: tuple[Path, dict[str, str]], transformer: ModelRuntime, student: Student
) -> None:
    model_dir, _ = built
    spec = student.spec
    assert spec.model_version == transformer.version and spec.labels == transformer.labels
    assert spec.fit["bound_on"] == "out_of_fold" and spec.fit["examples"] == len(TRAIN_EXAMPLES)
    assert spec.temperature == student.head.temperature
    copy = model_dir.parent / "saved-again"
    shutil.copytree(model_dir, copy)
    shutil.rmtree(copy / STUDENT_DIR)
    student.save(copy)
    again = Student.load(copy, model_version=transformer.version)
    assert again.spec == spec
    np.testing.assert_array_equal(again.predict_proba(TEXTS), student.predict_proba(TEXTS))
    loaded = CascadeRuntime.load(copy, device="cpu")
    assert loaded.bound == spec.bound and loaded.version == transformer.version
    np.testing.assert_array_equal(
        loaded.predict_proba(TEXTS), CascadeRuntime(transformer, student).predict_proba(TEXTS)
    )


def test_a_student_serves_only_its_own_model_version(built: tuple[Path, dict[str, str]]) -> None:
    with pytest.raises(ModelError, match="built for model version"):
        Student.load(built[0], model_version="another-version")
    with pytest.raises(ModelError, match="no cascade student"):
        Student.load(built[0].parent)


def test_the_setfit_files_are_unchanged_and_still_load(built: tuple[Path, dict[str, str]]) -> None:
    model_dir, before = built
    assert (model_dir / STUDENT_DIR / "student.json").is_file()
    assert _hashes(model_dir) == before
    bundle = load_model(model_dir)
    assert bundle.labels == sorted({e.label for e in TRAIN_EXAMPLES})
