"""The kafka-python :class:`~stream_classifier.transport.reader.TopicReader` (see :mod:`.reader`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka import errors as kerr

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError
from stream_classifier.ops.logs import log_event
from stream_classifier.transport.base import Partition, Record
from stream_classifier.transport.client_config import (
    describe_client_config,
    kafka_python_reader_config,
)
from stream_classifier.transport.kafka_python import connect, translate, unauthorized_topics
from stream_classifier.transport.reader import (
    ReaderBase,
    Start,
    denied_topics_error,
    discover,
    offsets_key,
    principal_hint,
)

logger = logging.getLogger(__name__)

_TOPIC_AUTHORIZATION_FAILED = kerr.TopicAuthorizationFailedError.errno
_POSITION_TIMEOUT_MS = 5_000


class KafkaPythonReader(ReaderBase):
    """Every partition of ``topics``, read from ``start`` without a consumer group."""

    def __init__(
        self, settings: KafkaSettings, topics: Sequence[str], *, start: Start, wait_for_topics_s: float
    ) -> None:
        self._settings = settings
        self._requested = list(topics)
        cfg = kafka_python_reader_config(settings)
        log_event(logger, "kafka_reader_config", config=describe_client_config(cfg), topics=list(topics))
        self._consumer = connect(settings, f"connecting to read topic(s) {list(topics)}", KafkaConsumer, cfg)
        self._partitions: list[Partition] = []
        self._checked_acls = False
        try:
            where = ",".join(settings.bootstrap_servers)
            self._partitions = discover(topics, self._partitions_of, wait_s=wait_for_topics_s, where=where)
            tps = self._tps()
            action = f"starting to read topic(s) {self.topics}"
            self._call(action, self._consumer.assign, tps)
            seek = self._consumer.seek_to_beginning if start == "beginning" else self._consumer.seek_to_end
            self._call(action, seek, *tps)
        except BaseException:
            self.close()
            raise

    def _tps(self) -> list[TopicPartition]:
        return [TopicPartition(*tp) for tp in self._partitions]

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except kerr.TopicAuthorizationFailedError as exc:
            raise denied_topics_error(self._requested, principal_hint(self._settings), action) from exc
        except (kerr.KafkaError, OSError) as exc:
            raise translate(exc, action) from exc

    def _partitions_of(self, topic: str) -> list[int]:
        ids = self._call(
            f"reading the metadata of topic {topic!r}", self._consumer.partitions_for_topic, topic
        )
        if ids:
            return sorted(ids)
        if not self._checked_acls:  # a denied topic is left out of the metadata, like a missing one
            self._checked_acls = True
            self._raise_if_denied()
        return []

    def _raise_if_denied(self) -> None:
        """Ask the broker whether it hides any requested topic for authorization.

        kafka-python's consumer cannot tell a denied topic from a missing one without asking
        for the topic by name, which makes a broker with ``auto.create.topics.enable``
        create a missing one; an admin client's DescribeTopics never does.
        """
        reader_cfg = kafka_python_reader_config(self._settings)  # the pass-through security too
        cfg = {key: value for key, value in reader_cfg.items() if key in KafkaAdminClient.DEFAULT_CONFIG}
        admin = connect(self._settings, "describing the topics", KafkaAdminClient, cfg)
        try:
            described = self._call("describing the topics", admin.describe_topics, self._requested)
        finally:
            admin.close()
        denied = [str(t.get("name")) for t in described if t.get("error_code") == _TOPIC_AUTHORIZATION_FAILED]
        if denied:
            raise denied_topics_error(denied, principal_hint(self._settings), "opening a reader")

    def _denied_check(self, action: str) -> None:
        denied = unauthorized_topics(self._consumer, self.topics)
        if denied:
            raise denied_topics_error(denied, principal_hint(self._settings), action)

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Record]:
        action = f"reading topic(s) {self.topics}"
        batches = self._call(action, self._consumer.poll, int(timeout_s * 1000), max_records=max_records)
        if not batches:
            self._denied_check(action)
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
            for records in batches.values()
            for r in records
        ]

    def positions(self) -> dict[str, int]:
        positions: dict[str, int] = {}
        for tp in self._tps():
            position = self._call(
                f"reading the position in {tp.topic}:{tp.partition}",
                self._consumer.position,
                tp,
                timeout_ms=_POSITION_TIMEOUT_MS,
            )
            if position is None:
                raise BrokerUnavailableError(f"reading the position in {tp.topic}:{tp.partition} timed out")
            positions[offsets_key(tp.topic, tp.partition)] = int(position)
        return positions

    def end_offsets(self) -> dict[str, int]:
        ends = self._call(
            f"reading the end offsets of {self.topics}", self._consumer.end_offsets, self._tps()
        )
        return {offsets_key(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        except (kerr.KafkaError, OSError) as exc:
            log_event(logger, "topic_reader_close_failed", logging.WARNING, error=str(exc))
