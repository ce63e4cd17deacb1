"""Helpers for the service integration tests: settings, the service in-process or as a
`serve` process, reading outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from prometheus_client import CollectorRegistry

from stream_classifier.app import App
from stream_classifier.config import KafkaSettings, Settings
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.service import PublishHook, StreamService
from stream_classifier.transport.base import Transport
from tests.fixtures.broker import (
    TEST_HEARTBEAT_MS,
    TEST_SESSION_TIMEOUT_MS,
    TopicFactory,
    transport_properties,
)


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
    settings: Settings,
    runtime: ModelRuntime,
    *,
    publish_hook: PublishHook | None = None,
    transport: Transport | None = None,
) -> Iterator[StreamService]:
    """The service, built by the composition root, on a thread of this process; stopped
    (gracefully) on exit, failing the test if it ended early or did not stop."""
    app = App(
        settings,
        runtime=runtime,
        metrics=Metrics(CollectorRegistry()),
        transport=transport,
        publish_hook=publish_hook,
        ops=False,
        learning=False,
    )
    with app.running(join_timeout_s=60):
        yield app.wait_started(timeout_s=60)


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


# --------------------------------------------------------------------------- `serve` processes


class ServeTopics(NamedTuple):
    source: str
    out: str
    dlq: str


def serve_topics(topic_factory: TopicFactory, *, partitions: int) -> ServeTopics:
    """Fresh input (with ``partitions``), output and dead-letter topics."""
    return ServeTopics(topic_factory("in", partitions=partitions), topic_factory("out"), topic_factory("dlq"))


def write_serve_config(
    path: Path,
    *,
    broker: str,
    group: str,
    topics: ServeTopics,
    model: Path,
    transport: str = "kafka-python",
    **sections: dict[str, Any],
) -> Path:
    """A `serve` config file for the test broker; ``sections`` are merged into the defaults."""
    config: dict[str, Any] = {
        "kafka": {
            "transport": transport,
            **transport_properties(transport),
            "bootstrap_servers": broker,
            "group_id": group,
            "input_topics": topics.source,
            "output_topic": topics.out,
            "dead_letter_topic": topics.dlq,
            "session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": TEST_HEARTBEAT_MS,
        },
        "model": {"path": str(model), "device": "cpu", "precision": "fp32"},
        "batching": {"max_batch_size": 32, "max_wait_ms": 10},
        "processing": {"shutdown_timeout_s": 20},
        "metrics": {"port": 0},  # an ephemeral port: tests run side by side
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`stream-classifier serve` as a child process, offline, its output appended to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    env["HF_HUB_OFFLINE"] = "1"
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_classifier", "serve", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )


@contextmanager
def serving(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start_serve`, killed on exit if the block left it running."""
    process = start_serve(config, log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()


def crash(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and reap it."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def terminate(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM ``process`` (a graceful stop) and return its exit status."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=40)
