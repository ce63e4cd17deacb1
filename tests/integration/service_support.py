"""Helpers for the service integration tests: settings, an in-process service, reading outputs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from stream_classifier.config import KafkaSettings, Settings
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.kafka_io import make_transport
from stream_classifier.stream.service import PublishHook, StreamService


def service_settings(kafka: KafkaSettings, **sections: Any) -> Settings:
    values: dict[str, Any] = {
        "batching": {"max_batch_size": 16, "max_wait_ms": 20},
        "metrics": {"lag_refresh_s": 1.0},
        "processing": {"shutdown_timeout_s": 20.0},
    }
    values.update(sections)
    return Settings(kafka=kafka, **values)


@contextmanager
def running_service(
    settings: Settings, runtime: ModelRuntime, *, publish_hook: PublishHook | None = None
) -> Iterator[StreamService]:
    """The service on a thread of this process; stopped (gracefully) on exit."""
    service = StreamService(
        settings,
        runtime,
        metrics=Metrics(CollectorRegistry()),
        transport=make_transport(settings.kafka),
        publish_hook=publish_hook,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:
            errors.append(exc)
            raise

    thread = threading.Thread(target=run, name="service-under-test", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the service did not stop"
    assert not errors, f"the service failed: {errors[0]!r}"


def wait_until(predicate: Any, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def output_body(record: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(record.value)
    return body


class TopicReader:
    """Reads a topic from the start (no group), accumulating records across calls."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        partitions = self._consumer.partitions_for_topic(topic) or set()
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self.records: list[Any] = []

    def read(self, timeout_s: float = 0.2) -> list[Any]:
        for batch in self._consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            self.records.extend(batch)
        return self.records

    def wait_for(self, predicate: Any, timeout_s: float = 60.0, what: str = "records") -> list[Any]:
        wait_until(lambda: predicate(self.read()), timeout_s, what)
        return self.records

    def close(self) -> None:
        self._consumer.close()
