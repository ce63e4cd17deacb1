"""From polled records to batched items: track each record, then decode it, dead-letter it or
batch it. Runs on the serving loop's I/O thread.

Invariants:

- **Every record is tracked before anything else happens to it**, so its offset is committed
  only once it is settled (dead letter acknowledged, or output published and acknowledged).
- **No record stops the stream.** A record that cannot be decoded becomes a dead letter
  with its codec reason; one whose output the broker refused before (read again after a
  rewind or an abort) is dead-lettered directly as ``output_rejected``; one the client
  cannot parse (:class:`~stream_classifier.errors.UnreadableRecordError`) is dead-lettered
  by its coordinates and the consumer moves past it.
- **The hot path.** One decode per record; the metrics are counted once per poll.
"""

from __future__ import annotations

import logging
from collections import Counter

from stream_classifier.config import InputSettings
from stream_classifier.errors import UnreadableRecordError
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.batcher import MicroBatcher
from stream_classifier.stream.codec import UNREADABLE_RECORD, InputDecoder, Rejected
from stream_classifier.stream.offsets import OffsetTracker
from stream_classifier.stream.output import Item
from stream_classifier.stream.sender import Sender
from stream_classifier.transport.base import Consumer, Partition, Record

logger = logging.getLogger(__name__)


class Intake:
    def __init__(
        self,
        settings: InputSettings,
        tracker: OffsetTracker,
        sender: Sender,
        batcher: MicroBatcher[Item],
        metrics: Metrics,
        *,
        keep_original: bool = False,
    ) -> None:
        self._decoder = InputDecoder(settings, keep_original=keep_original)
        self._tracker = tracker
        self._sender = sender
        self._batcher = batcher
        self._metrics = metrics

    def accept(self, records: list[Record], now: float) -> None:
        per_topic: Counter[str] = Counter()
        for record in records:
            per_topic[record.topic] += 1
            entry = self._tracker.track(record.tp, record.offset)
            decoded = self._sender.rejection(record) or self._decoder.decode(record)
            if isinstance(decoded, Rejected):
                self._sender.dead_letter(record, decoded, entry)
                entry.seal()
                self._tracker.settle(entry)
            else:
                self._batcher.add(Item(record, decoded, entry), now)
        for topic, count in per_topic.items():
            self._metrics.messages_consumed.labels(topic=topic).inc(count)

    def unreadable(self, exc: UnreadableRecordError, consumer: Consumer) -> None:
        """Dead-letter the coordinates of a record the client cannot parse, and read on after it."""
        tp = Partition(exc.topic, exc.partition)
        log_event(
            logger, "unreadable_record", logging.WARNING, partition=f"{tp[0]}:{tp[1]}", offset=exc.offset
        )
        if tp not in consumer.assignment():
            return
        record = Record(exc.topic, exc.partition, exc.offset, None, None, (), None)
        entry = self._tracker.track(tp, exc.offset)
        self._metrics.messages_consumed.labels(topic=exc.topic).inc()
        self._metrics.dead_letters.labels(reason=UNREADABLE_RECORD).inc()
        self._sender.minimal_dead_letter(record, Rejected(UNREADABLE_RECORD, str(exc)), entry)
        entry.seal()
        self._tracker.settle(entry)
        consumer.seek(tp, exc.offset + 1)
