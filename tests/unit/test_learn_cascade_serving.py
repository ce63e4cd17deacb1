"""model.cascade: serving picks the cascade only where the version's student is there."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("model2vec")

from stream_classifier.config import Settings
from stream_classifier.learn import updates
from stream_classifier.learn.updates import load_serving_runtime
from stream_classifier.model.cascade import CascadeRuntime, build_cascade
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.student import STUDENT_DIR


@pytest.fixture(scope="module")
def with_student(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    build_cascade(model_dir)
    return model_dir


@pytest.fixture(autouse=True)
def _info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=updates.__name__)


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r.getMessage(), getattr(r, "sc_fields", {})) for r in caplog.records if r.name == updates.__name__
    ]


def _settings(cascade: bool) -> Settings:
    return Settings(model={"device": "cpu", "cascade": cascade})


def test_the_cascade_is_off_by_default() -> None:
    assert Settings().model.cascade is False


def test_with_the_cascade_on_and_a_student_serving_runs_the_cascade(
    with_student: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = load_serving_runtime(_settings(True), with_student)
    assert isinstance(runtime, CascadeRuntime)
    assert runtime.version == runtime.transformer.version
    decided = runtime.predict_proba(["refund my card", "hello"])
    assert decided.decided_by is not None and len(decided.decided_by) == 2
    assert "cascade_unavailable" not in [name for name, _ in _events(caplog)]


def test_with_the_cascade_off_a_student_is_not_used(with_student: Path) -> None:
    assert type(load_serving_runtime(_settings(False), with_student)) is ModelRuntime


def test_without_a_student_the_transformer_serves_alone_with_a_warning(
    with_student: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(with_student, bare, ignore=shutil.ignore_patterns(STUDENT_DIR))
    runtime = load_serving_runtime(_settings(True), bare)
    assert type(runtime) is ModelRuntime
    assert not (bare / STUDENT_DIR).exists()  # never built at load
    unavailable = [fields for name, fields in _events(caplog) if name == "cascade_unavailable"]
    assert len(unavailable) == 1
    assert STUDENT_DIR in unavailable[0]["reason"]
