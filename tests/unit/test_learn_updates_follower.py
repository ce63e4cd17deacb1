"""The model-updates follower's loop while its topic cannot be read: the reader is opened again
after a backoff that doubles (1 s, 2 s, ...), the failure is logged once, and the manifest
poll goes on meanwhile. (Denied topics end to end: tests/integration/test_security_e2e.py.)"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stream_classifier.config import Settings
from stream_classifier.errors import TransportError
from stream_classifier.learn import updates
from stream_classifier.learn.updates import UpdatesFollower
from tests.fakes.learning import CountingSwapper, ManifestStore


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings() -> Iterator[_Warnings]:
    handler, root = _Warnings(), logging.getLogger("stream_classifier")
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_a_denied_updates_topic_is_retried_with_a_backoff_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, warnings: _Warnings
) -> None:
    opened: list[float] = []

    def make_reader(*args: Any, **kwargs: Any) -> Any:
        opened.append(time.monotonic())
        raise TransportError(
            "opening a reader failed: the cluster denies topic(s) ['upd'] to SASL user 'svc'"
        )

    monkeypatch.setattr(updates, "make_reader", make_reader)
    swapper = CountingSwapper()
    follower = UpdatesFollower(Settings(retrain={"manifest_poll_s": 0.5}), ManifestStore(), swapper)  # type: ignore[arg-type]
    thread = threading.Thread(target=follower.run, daemon=True)
    began = time.monotonic()
    thread.start()
    time.sleep(3.6)
    follower.stop()
    thread.join(5)
    assert not thread.is_alive()
    # Opened at about 0 s, 1 s and 3 s (once a second before: 4 opens, 4 warnings).
    gaps = [round(b - a, 1) for a, b in zip([began, *opened], opened, strict=False)][1:]
    assert len(opened) == 3, gaps
    assert gaps[1] > gaps[0] * 1.5, gaps
    assert warnings.messages.count("model_updates_unavailable") == 1, warnings.messages
    assert swapper.checks >= 5  # the manifest poll went on every 0.5 s
