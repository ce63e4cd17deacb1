"""Reading whole topics outside any consumer group: the feedback, trusted-eval and updates topics.

A :class:`TopicReader` assigns itself every partition of its topics (manual assignment: no
group, no committed offsets, no rebalances) and starts from the beginning or the end of
each. The learning side reads topics this way because its state is rebuilt from the topics
themselves at every start: committed offsets would make a restarted trainer skip the
history it needs.

Partitions added to a topic after the reader started are not followed (restart to pick
them up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

from kafka import KafkaConsumer, TopicPartition
from kafka import errors as kerr

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError, TransportError
from stream_classifier.ops.logs import log_event
from stream_classifier.transport import Record
from stream_classifier.transport.client_config import kafka_python_common_config

logger = logging.getLogger(__name__)

Start = Literal["beginning", "end"]


def offsets_key(topic: str, partition: int) -> str:
    """How a partition is named in the manifest's offset maps."""
    return f"{topic}:{partition}"


class TopicReader:
    """Every partition of ``topics``, read from ``start`` without a consumer group."""

    def __init__(
        self, settings: KafkaSettings, topics: Sequence[str], *, start: Start, wait_for_topics_s: float = 30.0
    ) -> None:
        cfg = kafka_python_common_config(settings)
        cfg.update(
            group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=settings.max_request_size
        )
        try:
            self._consumer = KafkaConsumer(**cfg)
        except (kerr.KafkaError, OSError) as exc:
            raise BrokerUnavailableError(f"cannot connect to read {list(topics)}: {exc}") from exc
        try:
            self._partitions = self._discover(topics, wait_for_topics_s)
            self._consumer.assign(self._partitions)
            if start == "beginning":
                self._consumer.seek_to_beginning(*self._partitions)
            else:
                self._consumer.seek_to_end(*self._partitions)
        except BaseException:
            self._consumer.close()
            raise

    def _discover(self, topics: Sequence[str], wait_s: float) -> list[TopicPartition]:
        deadline = time.monotonic() + wait_s
        found: list[TopicPartition] = []
        missing = list(topics)
        while True:
            for topic in list(missing):
                ids = self._consumer.partitions_for_topic(topic)
                if ids:
                    found.extend(TopicPartition(topic, p) for p in sorted(ids))
                    missing.remove(topic)
            if not missing:
                return found
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"topic(s) {missing} do not exist on {self._consumer.config['bootstrap_servers']}: "
                    "create them (feedback topics need retention.ms=-1 or cleanup.policy=compact)"
                )
            self._consumer.topics()  # refresh the metadata
            time.sleep(0.5)

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Record]:
        try:
            batches = self._consumer.poll(int(timeout_s * 1000), max_records=max_records)
        except (kerr.KafkaError, OSError) as exc:
            raise BrokerUnavailableError(f"reading {self.topics}: {exc}") from exc
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
            for records in batches.values()
            for r in records
        ]

    @property
    def topics(self) -> list[str]:
        return sorted({tp.topic for tp in self._partitions})

    def positions(self) -> dict[str, int]:
        """The next offset to read, per partition (``offsets_key`` names)."""
        return {offsets_key(tp.topic, tp.partition): self._consumer.position(tp) for tp in self._partitions}

    def end_offsets(self) -> dict[str, int]:
        try:
            ends = self._consumer.end_offsets(self._partitions)
        except (kerr.KafkaError, OSError) as exc:
            raise BrokerUnavailableError(f"reading end offsets of {self.topics}: {exc}") from exc
        return {offsets_key(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def read_to_end(self, timeout_s: float) -> list[Record]:
        """Every record up to the end offsets as of now (for a whole, finite topic read)."""
        targets = self.end_offsets()
        deadline = time.monotonic() + timeout_s
        records: list[Record] = []
        while any(self.positions()[k] < end for k, end in targets.items()):
            if time.monotonic() >= deadline:
                raise BrokerUnavailableError(f"timed out reading {self.topics} to their end")
            records.extend(self.poll(0.5))
        return records

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        except (kerr.KafkaError, OSError) as exc:
            log_event(logger, "topic_reader_close_failed", logging.WARNING, error=str(exc))
