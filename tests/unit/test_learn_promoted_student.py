"""With model.cascade on, a promotion installs the new version with its student built.

The promotion is the retrainer's own (:meth:`Retrainer._promote`) into a real model store;
the challenger directory is a copy of the tiny random body's model (a real, fast
model2vec distillation). The feedback reader is a stand-in: the promotion only tells it
which labels to protect.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("model2vec")

from stream_classifier.config import Settings
from stream_classifier.learn import promoted_student
from stream_classifier.learn.challenger import JobResult
from stream_classifier.learn.retrainer import Retrainer, RunRecord
from stream_classifier.learn.store import ModelStore
from stream_classifier.learn.updates import load_serving_runtime
from stream_classifier.model.cascade import CascadeRuntime
from stream_classifier.model.format import EXAMPLES_FILE
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.student import STUDENT_DIR, Student
from stream_classifier.ops.metrics import Metrics
from tests.fakes.transport import FakeTransport
from tests.fixtures.models import TRAIN_EXAMPLES


class _Feedback:
    def __init__(self) -> None:
        self.protected: list[list[str]] = []

    def protect(self, labels: list[str]) -> None:
        self.protected.append(labels)


@pytest.fixture(autouse=True)
def _info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=promoted_student.__name__)


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r.getMessage(), getattr(r, "sc_fields", {}))
        for r in caplog.records
        if r.name == promoted_student.__name__
    ]


def _promote(
    tiny_model_dir: Path, tmp_path: Path, *, cascade: bool, examples: bool = True
) -> tuple[Path, Settings]:
    settings = Settings(model={"device": "cpu", "cascade": cascade})
    store = ModelStore(tmp_path / "store")
    store.seed(tiny_model_dir, "v1")
    challenger = tmp_path / "run" / "model"
    shutil.copytree(tiny_model_dir, challenger)
    if not examples:
        (challenger / EXAMPLES_FILE).unlink()  # nothing to distil the student's head from: the build fails
    retrainer = Retrainer(
        settings,
        store,
        _Feedback(),
        Metrics(CollectorRegistry()),
        FakeTransport().producer(),  # type: ignore[arg-type]
    )
    record = RunRecord(run_id="r1", trigger="test", mode="full", champion="v1", labels=["billing"])
    result = JobResult(
        version="v2", labels=["billing"], train_examples=1, scores={"challenger": {}}, durations={}
    )
    retrainer._promote(record, challenger, result, {}, TRAIN_EXAMPLES)
    assert store.current()[0] == "v2"
    return store.path_of("v2"), settings


def test_a_promotion_with_the_cascade_on_installs_the_version_with_its_student(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    installed, settings = _promote(tiny_model_dir, tmp_path, cascade=True)
    version = ModelRuntime.load(installed, device="cpu").version
    assert Student.load(installed, model_version=version).labels
    assert isinstance(load_serving_runtime(settings, installed), CascadeRuntime)
    assert [name for name, _ in _events(caplog)] == ["cascade_built"]


def test_a_promotion_with_the_cascade_off_builds_no_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    installed, _ = _promote(tiny_model_dir, tmp_path, cascade=False)
    assert not (installed / STUDENT_DIR).exists()


def test_a_failed_build_is_logged_and_the_version_promoted_without_a_student(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    installed, settings = _promote(tiny_model_dir, tmp_path, cascade=True, examples=False)
    assert not (installed / STUDENT_DIR).exists()
    failed = [fields for name, fields in _events(caplog) if name == "cascade_build_failed"]
    assert len(failed) == 1 and failed[0]["error_type"] == "TrainingError"
    assert type(load_serving_runtime(settings, installed)) is ModelRuntime
