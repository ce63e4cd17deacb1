"""The feedback reader thread against a scripted topic: it survives every record and failure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_classifier.config import KafkaSettings, Settings
from stream_classifier.errors import BrokerUnavailableError, ConfigError
from stream_classifier.learn import feedback as feedback_module
from stream_classifier.learn.feedback import FeedbackReader
from stream_classifier.learn.retrainer import Retrainer
from stream_classifier.learn.store import ModelStore
from stream_classifier.ops.metrics import Metrics
from stream_classifier.transport import Headers, Record

TOPIC = "fb"


def _record(offset: int, value: bytes | None, headers: Headers = ()) -> Record:
    return Record(TOPIC, 0, offset, None, value, headers, None)


def _good(i: int, label: str = "billing") -> bytes:
    return json.dumps({"text": f"example number {i}", "label": label}).encode()


@dataclass
class ScriptedTopic:
    """One feedback partition; ``fail`` may raise from a reader call (by name and attempt)."""

    values: list[tuple[bytes | None, Headers]]
    fail: Callable[[str, int], None] = lambda call, attempt: None
    opened: int = 0

    def records(self) -> list[Record]:
        return [_record(i, value, headers) for i, (value, headers) in enumerate(self.values)]

    def open(self, settings: KafkaSettings, topics: list[str], *, start: str) -> ScriptedReader:
        self.opened += 1
        self.fail("open", self.opened)
        return ScriptedReader(self, self.opened)


@dataclass
class ScriptedReader:
    topic: ScriptedTopic
    attempt: int
    position: int = 0

    def end_offsets(self) -> dict[str, int]:
        self.topic.fail("end_offsets", self.attempt)
        return {f"{TOPIC}:0": len(self.topic.values)}

    def poll(self, timeout_s: float) -> list[Record]:
        self.topic.fail("poll", self.attempt)
        batch = self.topic.records()[self.position : self.position + 2]
        self.position += len(batch)
        if not batch:
            time.sleep(0.01)
        return batch

    def positions(self) -> dict[str, int]:
        self.topic.fail("positions", self.attempt)
        return {f"{TOPIC}:0": self.position}

    def close(self) -> None:
        pass


@dataclass
class RecordingProducer:
    sent: list[tuple[str, bytes | None, Headers]] = field(default_factory=list)

    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Headers,
        on_delivery: Callable[[BaseException | None], None],
    ) -> None:
        self.sent.append((topic, value, headers))
        on_delivery(None)

    def flush(self, timeout_s: float) -> bool:
        return True

    def reasons(self) -> list[str]:
        return [(dict(headers)["error"] or b"").decode() for _, _, headers in self.sent]


def _settings() -> Settings:
    return Settings(feedback={"topics": [TOPIC]}, kafka={"dead_letter_topic": "dlq"})


@contextmanager
def running(
    topic: ScriptedTopic, monkeypatch: pytest.MonkeyPatch, settings: Settings | None = None
) -> Iterator[tuple[FeedbackReader, Metrics, RecordingProducer, threading.Thread]]:
    monkeypatch.setattr(feedback_module, "make_reader", topic.open)
    metrics, producer = Metrics(CollectorRegistry()), RecordingProducer()
    reader = FeedbackReader(settings or _settings(), producer, metrics)
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    try:
        yield reader, metrics, producer, thread
    finally:
        reader.stop()
        thread.join(10)


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"stream_classifier_{name}", labels) or 0.0


def test_a_null_header_value_on_a_rejected_record_is_dead_lettered(monkeypatch: pytest.MonkeyPatch) -> None:
    # kafka-python hands a header whose value is null over as None.
    topic = ScriptedTopic([(b"not json", (("trace", None),)), (_good(1), (("trace", None),)), (_good(2), ())])
    with running(topic, monkeypatch) as (reader, metrics, producer, thread):
        assert reader.caught_up.wait(10), "the reader never caught up"
        assert thread.is_alive()
        assert producer.reasons() == ["invalid_json"]
        assert _sample(metrics, "dead_letters_total", reason="invalid_json") == 1
        assert _sample(metrics, "feedback_received_total") == 2


def test_an_unexpected_error_on_one_record_rejects_that_record_only(monkeypatch: pytest.MonkeyPatch) -> None:
    real_decode = feedback_module.decode_feedback

    def decode(value, *args, **kwargs):  # type: ignore[no-untyped-def]
        if value == b"boom":
            raise RuntimeError("a bug that only this record reaches")
        return real_decode(value, *args, **kwargs)

    monkeypatch.setattr(feedback_module, "decode_feedback", decode)
    topic = ScriptedTopic([(_good(1), ()), (b"boom", ()), (_good(2), ())])
    with running(topic, monkeypatch) as (reader, metrics, producer, thread):
        assert reader.caught_up.wait(10), "the reader never caught up"
        assert thread.is_alive()
        assert producer.reasons() == ["processing_failed"]
        assert _sample(metrics, "dead_letters_total", reason="processing_failed") == 1
        assert _sample(metrics, "feedback_reader_errors_total", stage="record") == 1
        assert _sample(metrics, "feedback_received_total") == 2


def test_a_failing_read_loop_is_retried_and_still_catches_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(call: str, attempt: int) -> None:
        if call == "positions" and attempt == 1:  # after the first batch was taken
            raise OSError("connection reset")

    topic = ScriptedTopic([(b"not json", ()), (_good(1), ()), (_good(2), ()), (_good(3), ())], fail)
    with running(topic, monkeypatch) as (reader, metrics, producer, thread):
        assert reader.caught_up.wait(10), "the reader never caught up"
        assert thread.is_alive()
        assert topic.opened == 2
        assert _sample(metrics, "feedback_reader_errors_total", stage="read") == 1
        assert producer.reasons() == ["invalid_json"]  # the re-read does not dead-letter twice
        assert reader.error is None
        _, offsets, fresh = reader.snapshot()
        assert fresh == 3
        assert offsets == {f"{TOPIC}:0": 4}


def test_a_reader_that_keeps_failing_reports_it_and_the_retrainer_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail(call: str, attempt: int) -> None:
        if call == "open":
            raise BrokerUnavailableError("no broker answers")

    with running(ScriptedTopic([], fail), monkeypatch) as (reader, metrics, producer, _):
        retrainer = Retrainer(_settings(), ModelStore(tmp_path / "store"), reader, metrics, producer)
        loop = threading.Thread(target=retrainer.run, daemon=True)
        loop.start()
        try:
            deadline = time.monotonic() + 10
            while reader.error is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert isinstance(reader.error, BrokerUnavailableError)
            assert not reader.caught_up.is_set()
            for expected in (1, 2):  # every request is answered (POST /retrain: 202, not 409)
                assert retrainer.request()
                while _sample(metrics, "retrain_runs_total", outcome="failed") < expected:
                    assert time.monotonic() < deadline, "the retrainer never answered"
                    time.sleep(0.01)
            assert retrainer.last_record is not None
            assert "no broker answers" in retrainer.last_record.reason
        finally:
            retrainer.stop()
            loop.join(10)
        assert _sample(metrics, "feedback_reader_errors_total", stage="read") >= 1


def test_a_label_that_cannot_be_encoded_never_reaches_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = json.dumps({"text": "hi", "label": "\ud800"}, ensure_ascii=True).encode()
    with running(ScriptedTopic([(hostile, ()), (_good(1), ())]), monkeypatch) as (
        reader,
        metrics,
        producer,
        _,
    ):
        assert reader.caught_up.wait(10), "the reader never caught up"
        generate_latest(metrics.registry)  # what /metrics serves
        assert producer.reasons() == ["invalid_label"]


def test_allowed_labels_must_be_usable_labels() -> None:
    settings = Settings(feedback={"topics": [TOPIC], "allowed_labels": ["ok", "bell\u0007"]})
    with pytest.raises(ConfigError, match=r"feedback\.allowed_labels"):
        FeedbackReader(settings, RecordingProducer(), Metrics(CollectorRegistry()))


def test_an_evicted_label_leaves_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    values = [(_good(i, "a"), ()) for i in range(2)] + [(_good(10 + i, "b"), ()) for i in range(3)]
    # One open slot: "a" takes it, is gauged, then "b" is seen more often and evicts it.
    settings = Settings(
        feedback={"topics": [TOPIC], "max_labels": 2, "min_label_examples": 2, "allowed_labels": ["kept"]}
    )
    topic = ScriptedTopic([*values, (_good(20, "kept"), ())])
    with running(topic, monkeypatch, settings) as (reader, metrics, _, _):
        assert reader.caught_up.wait(10), "the reader never caught up"
        assert reader.snapshot()[0].labels == ["b", "kept"]
        assert _sample(metrics, "feedback_examples", label="b") == 2
        assert _sample(metrics, "feedback_examples", label="kept") == 1
        assert (
            metrics.registry.get_sample_value("stream_classifier_feedback_examples", {"label": "a"}) is None
        )
        assert _sample(metrics, "feedback_dropped_total", reason="label_evicted") == 2
