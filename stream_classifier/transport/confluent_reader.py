"""The confluent-kafka (librdkafka) :class:`~stream_classifier.transport.reader.TopicReader`.

Imported only with ``kafka.transport: confluent``. The start offsets are resolved when the
reader opens (the low watermark for ``beginning``, the high one for ``end``) and assigned
explicitly, so :meth:`ConfluentReader.positions` is exact before the first fetch too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import confluent_kafka as ck

from stream_classifier.config import KafkaSettings
from stream_classifier.ops.logs import log_event
from stream_classifier.transport.base import Partition, Record
from stream_classifier.transport.client_config import confluent_reader_config, describe_client_config
from stream_classifier.transport.confluent import ClientErrors, librdkafka_logger, records_of, translate
from stream_classifier.transport.reader import (
    ReaderBase,
    Start,
    denied_topics_error,
    discover,
    offsets_key,
    principal_hint,
)

logger = logging.getLogger(__name__)

_METADATA_TIMEOUT_S = 5.0
_WATERMARK_TIMEOUT_S = 5.0


class ConfluentReader(ReaderBase):
    """Every partition of ``topics``, read from ``start`` without joining a group."""

    def __init__(
        self, settings: KafkaSettings, topics: Sequence[str], *, start: Start, wait_for_topics_s: float
    ) -> None:
        self._settings = settings
        self._requested = list(topics)
        cfg = confluent_reader_config(settings)
        log_event(logger, "kafka_reader_config", config=describe_client_config(cfg), topics=list(topics))
        self._errors = ClientErrors("reader")
        cfg.update(error_cb=self._errors, logger=librdkafka_logger)
        self._consumer = self._call(f"connecting to read topic(s) {list(topics)}", ck.Consumer, cfg)
        self._partitions: list[Partition] = []
        self._next: dict[Partition, int] = {}
        try:
            where = ",".join(settings.bootstrap_servers)
            self._partitions = discover(topics, self._partitions_of, wait_s=wait_for_topics_s, where=where)
            action = f"starting to read topic(s) {self.topics}"
            for tp in self._partitions:
                low, high = self._watermarks(tp, action)
                self._next[tp] = low if start == "beginning" else high
            assignment = [
                ck.TopicPartition(tp.topic, tp.partition, self._next[tp]) for tp in self._partitions
            ]
            self._call(action, self._consumer.assign, assignment)
        except BaseException:
            self.close()
            raise

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` with librdkafka's errors classified; a refusal seen by ``error_cb`` wins."""
        try:
            result = fn(*args, **kwargs)
        except ck.KafkaException as exc:
            self._serve_callbacks()
            self._errors.raise_if_fatal(action)
            raise translate(exc, action) from exc
        self._errors.raise_if_fatal(action)
        return result

    def _serve_callbacks(self) -> None:
        """Let librdkafka report what it saw (``error_cb``): only ``consume`` serves it."""
        consumer = getattr(self, "_consumer", None)
        if consumer is not None and not self._partitions:
            consumer.consume(num_messages=1, timeout=0)

    def _partitions_of(self, topic: str) -> list[int]:
        action = f"reading the metadata of topic {topic!r}"
        metadata = self._call(action, self._consumer.list_topics, topic, timeout=_METADATA_TIMEOUT_S)
        self._serve_callbacks()
        self._errors.raise_if_fatal(action)
        described = metadata.topics.get(topic)
        error = getattr(described, "error", None)
        if error is not None and error.name() == "TOPIC_AUTHORIZATION_FAILED":
            raise denied_topics_error([topic], principal_hint(self._settings), "opening a reader")
        if error is not None and error.name() not in ("UNKNOWN_TOPIC_OR_PART", "LEADER_NOT_AVAILABLE"):
            raise translate(ck.KafkaException(error), action)
        return sorted(described.partitions) if described is not None and error is None else []

    def _watermarks(self, tp: Partition, action: str) -> tuple[int, int]:
        low, high = self._call(
            action,
            self._consumer.get_watermark_offsets,
            ck.TopicPartition(tp.topic, tp.partition),
            timeout=_WATERMARK_TIMEOUT_S,
            cached=False,
        )
        return int(low), int(high)

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Record]:
        action = f"reading topic(s) {self.topics}"
        messages = self._call(action, self._consumer.consume, num_messages=max_records, timeout=timeout_s)
        records = records_of(messages, action, self._settings, self.topics)
        for record in records:
            self._next[record.tp] = max(self._next.get(record.tp, 0), record.offset + 1)
        return records

    def positions(self) -> dict[str, int]:
        """librdkafka's position where it has one (it steps over transaction markers), else
        the next offset after the records read (or the start offset)."""
        known = self._call(
            f"reading the positions in {self.topics}",
            self._consumer.position,
            [ck.TopicPartition(tp.topic, tp.partition) for tp in self._partitions],
        )
        for entry in known:
            tp = Partition(entry.topic, entry.partition)
            if entry.offset >= 0:
                self._next[tp] = max(self._next.get(tp, 0), int(entry.offset))
        return {offsets_key(*tp): self._next[tp] for tp in self._partitions}

    def end_offsets(self) -> dict[str, int]:
        action = f"reading the end offsets of {self.topics}"
        return {offsets_key(*tp): self._watermarks(tp, action)[1] for tp in self._partitions}

    def close(self) -> None:
        consumer = getattr(self, "_consumer", None)
        if consumer is None:
            return
        try:
            consumer.close()
        except (ck.KafkaException, RuntimeError) as exc:
            log_event(logger, "topic_reader_close_failed", logging.WARNING, error=str(exc))
