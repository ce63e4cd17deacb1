"""Dropping uncommitted work so that it is read again: a rewind, a revoke or loss, an abort.

Runs on the serving loop's I/O thread. The dropped messages become stale
(:meth:`OffsetTracker.is_current` is false): results and acknowledgements that arrive for
them later are ignored, and they are read again, so nothing is lost.

Invariants:

- **A rewind** (a failed delivery, a broken runtime) re-reads a partition from its oldest
  pending message; its commit point stays, so the acknowledged prefix is still committed.
- **A revoke or loss** drops the partitions' in-flight messages uncommitted. A partition
  the consumer goes on reading from its position (:meth:`Consumer.retained`: kafka-python
  revoked and re-assigned it) is sought back to its oldest dropped message; every other one
  (moved elsewhere, or revoked by librdkafka while ``assignment()`` still lists it) loses its
  state, commit point included, and is read from the committed offset by whoever owns it
  next. Up to the in-flight messages of a revoked partition may so be published twice.
- **An undo** (an aborted transaction) drops every partition's work and seeks each held
  partition back to its restart point.
"""

from __future__ import annotations

import contextlib

from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.batcher import MicroBatcher
from stream_classifier.stream.offsets import OffsetTracker
from stream_classifier.stream.output import Item
from stream_classifier.stream.pauses import Pauses
from stream_classifier.transport.base import Consumer, Partition


class Rereads:
    def __init__(
        self, tracker: OffsetTracker, batcher: MicroBatcher[Item], pauses: Pauses, metrics: Metrics
    ) -> None:
        self._tracker = tracker
        self._batcher = batcher
        self._pauses = pauses
        self._metrics = metrics

    def rewind(self, partition: Partition, consumer: Consumer | None) -> None:
        """Re-read ``partition`` from its oldest pending message; its commit point stays."""
        resume = self._tracker.rewind(partition)
        if resume is None:
            return
        self._batcher.drop(lambda item: item.record.tp == partition)
        if consumer is not None and partition in consumer.assignment():
            consumer.seek(partition, resume)

    def forget(self, partitions: set[Partition], consumer: Consumer | None, held: set[Partition]) -> None:
        """Drop the in-flight work of ``partitions`` uncommitted, so that it is read again.

        ``held``: those of them the consumer goes on reading from its position
        (:meth:`Consumer.retained` inside a rebalance callback; empty when the delivery
        strategy committed all their work, or the clients are being replaced). The others'
        state goes and nothing is sought for them.
        """
        resume = {tp: self._tracker.resume_point(tp) for tp in partitions}
        # A held partition with nothing pending keeps its state (and its uncommitted commit point).
        stale = {tp for tp in partitions if tp not in held or resume[tp] is not None}
        self._tracker.drop(stale)
        self._batcher.drop(lambda item: item.record.tp in stale)
        for tp in stale:
            offset = resume[tp]
            if offset is not None and tp in held and consumer is not None:
                consumer.seek(tp, offset)
            self._pauses.release(tp)
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def undo(self, consumer: Consumer) -> None:
        """Drop all uncommitted work and re-read each held partition from its restart point."""
        partitions = set(self._tracker.partitions())
        restart = {tp: self._tracker.restart_point(tp) for tp in partitions}
        held = consumer.assignment()
        self._tracker.drop(partitions)
        self._batcher.drop(lambda item: True)
        for tp, offset in restart.items():
            if offset is not None and tp in held:
                consumer.seek(tp, offset)
