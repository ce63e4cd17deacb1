"""The model-updates follower keeps following whatever one version does when it is loaded."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.config import Settings
from stream_classifier.errors import ModelError
from stream_classifier.learn import updates
from stream_classifier.learn.updates import ModelSwapper, UpdatesFollower
from stream_classifier.ops.metrics import Metrics

FAILURES = "stream_classifier_model_update_failures_total"


class _Store:
    """The two calls the follower and the swapper make of a :class:`ModelStore`."""

    def __init__(self, current: str) -> None:
        self.current = current

    def read(self) -> Any:
        return self

    def path_of(self, version: str) -> Path:
        return Path("/store/versions") / version


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((record.getMessage(), getattr(record, "sc_fields", {})))


@pytest.fixture
def events() -> Iterator[_Events]:
    handler, logger = _Events(), logging.getLogger(updates.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("CUDA out of memory"),
        IndexError("index 3 is out of bounds"),
        MemoryError(),
        ModelError("model_head.pkl: the head's coef holds NaN or infinite values"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_a_version_that_fails_to_load_is_logged_counted_and_passed(
    failure: Exception, monkeypatch: pytest.MonkeyPatch, events: _Events
) -> None:
    def load_runtime(settings: Settings, path: Path) -> Any:
        if path.name == "bad":
            raise failure
        return f"runtime of {path.name}"

    monkeypatch.setattr(updates, "load_runtime", load_runtime)
    metrics, store, swapped = Metrics(CollectorRegistry()), _Store("bad"), []
    swapper = ModelSwapper(Settings(), store, swapped.append, metrics, serving_version="v0")
    follower = UpdatesFollower(Settings(), store, swapper)

    follower.check()
    assert swapper.serving_version == "v0" and swapped == []
    assert metrics.registry.get_sample_value(FAILURES) == 1
    failed = [fields for event, fields in events.events if event == "model_update_failed"]
    assert failed == [{"version": "bad", "error_type": type(failure).__name__, "error": str(failure)}]

    store.current = "good"
    follower.check()
    assert swapper.serving_version == "good" and swapped == ["runtime of good"]
    assert metrics.registry.get_sample_value(FAILURES) == 1


def test_an_unreadable_manifest_is_logged_and_counted(events: _Events) -> None:
    class _Broken(_Store):
        def read(self) -> Any:
            raise OSError("stale file handle")

    metrics, store = Metrics(CollectorRegistry()), _Broken("v1")
    swapper = ModelSwapper(Settings(), store, [].append, metrics, serving_version="v0")
    UpdatesFollower(Settings(), store, swapper).check()
    assert metrics.registry.get_sample_value(FAILURES) == 1
    assert [fields.get("version") for event, fields in events.events if event == "model_update_failed"] == [
        None
    ]
