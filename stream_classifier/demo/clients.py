"""The demo's own Kafka clients: it produces the sample to the input topic and reads the
output and dead-letter topics like any other client would, with the configured security."""

from __future__ import annotations

import contextlib
import json
import logging

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from stream_classifier.config import Settings
from stream_classifier.demo.view import Seen
from stream_classifier.errors import TransportError
from stream_classifier.model.examples import Example
from stream_classifier.transport.client_config import kafka_python_common_config

logger = logging.getLogger(__name__)


def _client_config(settings: Settings) -> dict[str, object]:
    cfg: dict[str, object] = kafka_python_common_config(settings.kafka)
    cfg["client_id"] = "stream-classifier-demo"
    return cfg


def demo_messages(
    examples: list[Example], count: int, run_id: str, *, input_format: str, text_field: str, id_field: str
) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    """``count`` input messages cycled from ``examples``, keyed by their id, and id -> label."""
    messages: list[tuple[bytes, bytes]] = []
    expected: dict[str, str] = {}
    for i in range(count):
        example = examples[i % len(examples)]
        message_id = f"{run_id}-{i:05d}"
        expected[message_id] = example.label
        if input_format == "text":
            value = example.text.encode("utf-8")
        else:
            value = json.dumps({id_field: message_id, text_field: example.text}).encode("utf-8")
        messages.append((message_id.encode("utf-8"), value))
    return messages, expected


def produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    """Send ``messages`` (key, value) to ``topic`` and wait until the broker has them all."""
    try:
        producer = KafkaProducer(**_client_config(settings), acks="all", linger_ms=5, max_block_ms=10_000)
    except KafkaError as exc:
        raise TransportError(f"the demo cannot connect to {settings.kafka.bootstrap_servers}: {exc}") from exc
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    except KafkaError as exc:
        raise TransportError(f"the demo could not produce to topic {topic!r}: {exc}") from exc
    finally:
        producer.close(timeout=5)


class OutputWatcher:
    """Reads the output and dead-letter topics from their current end, keeping this run's records.

    It assigns every partition itself (no consumer group), so it never disturbs the
    service's group and sees each record exactly once.
    """

    def __init__(self, settings: Settings, run_id: str) -> None:
        self._run_prefix: str | None = run_id + "-"
        self._output_topic = settings.kafka.output_topic
        self._consumer = KafkaConsumer(
            **_client_config(settings), group_id=None, enable_auto_commit=False, auto_offset_reset="latest"
        )
        partitions = []
        for topic in (settings.kafka.output_topic, settings.kafka.dead_letter_topic):
            ids = self._consumer.partitions_for_topic(topic) or {0}
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        self._consumer.assign(partitions)
        self._consumer.seek_to_end()
        for tp in partitions:  # resolve the end offsets now, before the demo produces anything
            self._consumer.position(tp)

    def poll(self, timeout_s: float) -> list[Seen]:
        seen: list[Seen] = []
        for records in self._consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            for record in records:
                key = record.key.decode("utf-8", errors="replace") if record.key else ""
                if self._run_prefix is not None and not key.startswith(self._run_prefix):
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    # Not an output of this service (another producer on the topic): skip it.
                    seen.append(self._parse(record.topic, key, record.value, record.headers or []))
        return seen

    def accept_all(self) -> None:
        """From now on, keep every record, not only this run's."""
        self._run_prefix = None

    def _parse(self, topic: str, key: str, value: bytes | None, headers: list[tuple[str, bytes]]) -> Seen:
        if topic == self._output_topic and value is not None:
            output = json.loads(value)
            probabilities: dict[str, float] = output["probabilities"]
            return Seen(
                key=key,
                label=str(output["label"]),
                confidence=max(probabilities.values()),
            )
        reason = dict(headers).get("error", b"unknown").decode("utf-8", errors="replace")
        return Seen(key=key, reason=reason)

    def close(self) -> None:
        self._consumer.close()


# --------------------------------------------------------------------------- the live view
