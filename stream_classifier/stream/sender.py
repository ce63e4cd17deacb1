"""Producing a tracked message's records and settling their acknowledgements.

Everything between a record ready to produce and an acknowledged one: outputs, dead letters,
the fallback forms of refused records, and the acknowledgement queue the producer's
callbacks feed. Runs on the serving loop's I/O thread only; the producer's callbacks only
enqueue.

Invariants:

- **Offsets.** Every record sent for a message counts against it (:meth:`Pending.sent`) until
  its acknowledgement is drained; only then may the message's offset be committed
  (:mod:`stream_classifier.stream.offsets`). Acknowledgements of stale messages (their
  partition was revoked or rewound) are ignored.
- **No record stops the stream.** A record the broker refuses for good
  (:class:`~stream_classifier.errors.RecordRejectedError`) or one larger than
  ``kafka.max_request_size`` is replaced by its next form: an output by a dead letter of its
  input (remembered, so that the input is dead-lettered directly when read again after a
  rewind or an abort; :data:`_REJECTED_MEMORY` entries at most), a dead letter by a minimal
  one (coordinates and reason). Only a dead-letter topic that refuses even the minimal form
  stops the service (:class:`~stream_classifier.errors.TransportError`), since going on
  would lose the message.
- **Transient failures back off.** A failed delivery is reported through ``on_failed`` with
  its partition and a delay that doubles until a delivery succeeds; the loop rewinds that
  partition to its oldest unacknowledged message and pauses it for the delay. Only what was
  sent and not acknowledged is published again.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError, RecordRejectedError, TransportError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.backoff import Backoff
from stream_classifier.stream.codec import (
    OUTPUT_REJECTED,
    OUTPUT_TOO_LARGE,
    OutgoingRecord,
    Rejected,
    encode_dead_letter,
    minimal_dead_letter,
    record_size,
)
from stream_classifier.stream.delivery import Delivery
from stream_classifier.stream.offsets import OffsetTracker, Pending
from stream_classifier.transport.base import Partition, Producer, Record

logger = logging.getLogger(__name__)

_REJECTED_MEMORY = 10_000  # inputs whose output the broker refused, dead-lettered when read again

# What a produced record is for, so that a refusal can fall back to the next form.
OUTPUT, DEAD_LETTER, MINIMAL = "output", "dead_letter", "minimal_dead_letter"


@dataclass(frozen=True, slots=True)
class _Ack:
    entry: Pending
    error: BaseException | None
    timestamp_ms: int | None
    source: Record  # the input the record was made for
    kind: str  # OUTPUT, DEAD_LETTER or MINIMAL
    rejected: Rejected | None  # a dead letter's reason


class Sender:
    """Sends records for tracked messages and drains their acknowledgements.

    ``producer`` is the current producer (the loop replaces it on reconnect); ``on_failed``
    is called with a partition whose delivery failed and the delay to pause it for.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        tracker: OffsetTracker,
        delivery: Delivery,
        metrics: Metrics,
        health: HealthState,
        *,
        on_failed: Callable[[Partition, float], None],
    ) -> None:
        self.producer: Producer | None = None
        self._kafka = kafka
        self._tracker = tracker
        self._delivery = delivery
        self._metrics = metrics
        self._health = health
        self._on_failed = on_failed
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._backoff = Backoff("delivery")
        self._rejected: OrderedDict[tuple[Partition, int], Rejected] = OrderedDict()

    def rejection(self, record: Record) -> Rejected | None:
        """Why ``record``'s output was refused before, when it was (read again after a rewind)."""
        return self._rejected.get((record.tp, record.offset))

    def dead_letter(self, record: Record, rejected: Rejected, entry: Pending) -> None:
        out = encode_dead_letter(
            record, rejected, self._kafka.dead_letter_topic, self._kafka.max_request_size
        )
        self._metrics.dead_letters.labels(reason=rejected.reason).inc()
        self.send(out, entry, record, DEAD_LETTER, rejected=rejected)

    def minimal_dead_letter(self, record: Record, rejected: Rejected, entry: Pending) -> None:
        """The coordinates-and-reason dead letter (a record the client cannot parse)."""
        out = minimal_dead_letter(record, rejected, self._kafka.dead_letter_topic)
        self.send(out, entry, record, MINIMAL)

    def send(
        self,
        out: OutgoingRecord,
        entry: Pending,
        source: Record,
        kind: str,
        timestamp_ms: int | None = None,
        *,
        rejected: Rejected | None = None,
    ) -> bool:
        """Produce ``out`` for ``entry``'s message; False when it was too large to try.

        A too-large output dead-letters its input instead (``output_too_large``).
        """
        assert self.producer is not None
        size = record_size(out.key, out.value, out.headers)
        if size > self._kafka.max_request_size:
            message = f"the output is {size} bytes; kafka.max_request_size is {self._kafka.max_request_size}"
            self._replace_refused(entry, source, kind, rejected, Rejected(OUTPUT_TOO_LARGE, message))
            return False
        acks = self._acks
        entry.sent()
        self._delivery.sending(self.producer)

        def delivered(error: BaseException | None) -> None:
            acks.put(_Ack(entry, error, timestamp_ms, source, kind, rejected))

        try:
            self.producer.send(
                out.topic,
                out.value,
                key=out.key,
                headers=out.headers,
                on_delivery=delivered,
                timestamp_ms=out.timestamp_ms,
            )
        except (BrokerUnavailableError, RecordRejectedError) as exc:
            delivered(exc)
        return True

    def _replace_refused(
        self, entry: Pending, source: Record, kind: str, rejected: Rejected | None, why: Rejected
    ) -> None:
        """Send the next form of a record the broker will not take: output -> dead letter -> minimal."""
        if kind == OUTPUT:
            self._remember_rejection(source, why)
            self.dead_letter(source, why, entry)
        elif kind == DEAD_LETTER:
            reason = rejected or why
            letter = Rejected(reason.reason, f"{reason.message} (full dead letter refused: {why.message})")
            self.minimal_dead_letter(source, letter, entry)
        else:
            raise TransportError(
                f"the dead-letter topic {self._kafka.dead_letter_topic!r} refuses even a minimal dead letter "
                f"for {source.topic}:{source.partition}:{source.offset} ({why.message}); check that topic's "
                "ACLs (WRITE for this principal) and its max.message.bytes"
            )

    def _remember_rejection(self, record: Record, rejected: Rejected) -> None:
        """Dead-letter this input directly if it is read again (after a rewind or an abort)."""
        self._rejected[(record.tp, record.offset)] = Rejected(OUTPUT_REJECTED, rejected.message)
        while len(self._rejected) > _REJECTED_MEMORY:
            self._rejected.popitem(last=False)

    def drain(self) -> None:
        """Serve the producer's callbacks and settle every acknowledgement they queued."""
        assert self.producer is not None
        self.producer.poll(0)
        now_ms = time.time() * 1000
        delivered = False
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                if delivered:
                    self._health.producer_acknowledged()
                return
            entry = ack.entry
            delivered = delivered or ack.error is None
            if not self._tracker.is_current(entry):
                continue
            if ack.error is None:
                entry.acknowledged()
                self._tracker.settle(entry)
                self._backoff.ok()
                if ack.timestamp_ms is not None and ack.timestamp_ms > 0:
                    self._metrics.end_to_end_latency.observe(max(0.0, (now_ms - ack.timestamp_ms) / 1000))
                continue
            self._metrics.produce_errors.inc()
            if isinstance(ack.error, RecordRejectedError):
                log_event(logger, "record_rejected", logging.WARNING, kind=ack.kind, error=str(ack.error))
                why = Rejected(OUTPUT_REJECTED, str(ack.error)[:500])
                self._replace_refused(entry, ack.source, ack.kind, ack.rejected, why)
                entry.acknowledged()  # this record is settled: its replacement now holds the message
                self._tracker.settle(entry)
                continue
            partition = entry.owner.partition
            log_event(
                logger,
                "delivery_failed",
                logging.WARNING,
                partition=f"{partition[0]}:{partition[1]}",
                resume_offset=self._tracker.resume_point(partition),
                error=repr(ack.error),
            )
            self._health.set_producer_connected(False)
            self._on_failed(partition, self._backoff.failed(ack.error))
