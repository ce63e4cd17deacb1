"""The serving loop: poll, decode, micro-batch, infer, publish, commit.

Two threads share the work:

- the **I/O thread** (the caller of :meth:`StreamService.run`) polls, decodes, batches,
  tokenises, encodes and produces outputs and dead letters, and commits offsets; it alone
  touches the consumer, the producer and the offset tracker;
- the **compute thread** (:mod:`stream_classifier.stream.compute`) only runs ``infer``.

Invariants (ARCHITECTURE.md names this module for them):

- **The model is never idle while other work waits.** Up to ``_PIPELINE_DEPTH`` prepared
  batches are queued ahead of the compute thread; decoding, tokenising, encoding and
  producing overlap with inference.
- **Offsets** (at-least-once). A partition's offset is committed only when every record
  for that message and all earlier ones in the partition was acknowledged by the producer
  (see :mod:`stream_classifier.stream.offsets`).
- **No record stops the stream.** A record that cannot be decoded, one whose output the
  broker refuses for good (:class:`~stream_classifier.errors.RecordRejectedError`, or larger
  than ``kafka.max_request_size``), and one the client cannot parse
  (:class:`~stream_classifier.errors.UnreadableRecordError`) each become a dead letter with
  its reason, and its partition goes on. A refused dead letter falls back to a minimal one
  (coordinates and reason); only a dead-letter topic that refuses even that stops the
  service (:class:`~stream_classifier.errors.TransportError`), since going on would lose
  the message.
- **Transient failures back off without stopping the loop.** A failed delivery rewinds its
  partition to the oldest unacknowledged message (keeping the acknowledged prefix
  committable) and pauses that partition for a backoff that doubles until a delivery
  succeeds; the loop keeps ticking, polling and heartbeating meanwhile. Only what was
  sent and not acknowledged is published again.
- **A broken runtime is not a bad message.** When the model itself fails (out of memory, a
  broken model: see :mod:`.compute`), its batch is rewound, consumption pauses for a
  growing backoff and readiness drops; no message is dead-lettered for it.
- **Ordering.** Batches leave the compute thread in the order they entered, and each batch
  is produced in input order by one producer with idempotence on, so outputs of one input
  partition come out in input order (a rewind re-emits from the rewound message onwards).
- **The model reference.** Only :meth:`StreamService.swap_model` replaces it, between batches;
  each output names the version that computed it.
- **Bounded state.** At most ``batching.max_in_flight`` messages are consumed and not yet
  committed: above it the consumer pauses (it never drops); the compute queue holds at most
  ``_PIPELINE_DEPTH`` batches; the memory of refused inputs holds ``_REJECTED_MEMORY``.
- **Rebalance.** On revoke (or loss), the in-flight messages of those partitions are dropped
  uncommitted and read again — by the next owner from the committed offset, or, for a
  partition this instance still holds (kafka-python keeps the fetch position of a
  partition revoked and re-assigned to the same member), after a seek back to the oldest
  dropped message. Up to the in-flight messages of a revoked partition may be published
  twice. On assign, consumption starts at the committed offsets.
- **Shutdown** (:meth:`StreamService.stop`, e.g. on SIGTERM): stop polling, run what is
  batched, publish, flush, commit, leave the group, within ``processing.shutdown_timeout_s``
  (the exactly-once commit included).
- **Delivery guarantee.** How offsets commit (at-least-once, or exactly-once with
  transactions, including what a revoke commits or aborts) is
  :mod:`stream_classifier.stream.delivery`, picked once; the loop commits through it every
  ``commit_interval_ms``, on revoke and on shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stream_classifier.config import Settings
from stream_classifier.errors import (
    BrokerUnavailableError,
    RecordRejectedError,
    TransportError,
    UnreadableRecordError,
)
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.backoff import Backoff
from stream_classifier.stream.batcher import MicroBatcher
from stream_classifier.stream.classifier import Classifier
from stream_classifier.stream.codec import (
    INFERENCE_FAILED,
    OUTPUT_REJECTED,
    OUTPUT_TOO_LARGE,
    UNREADABLE_RECORD,
    Decoded,
    InputDecoder,
    OutgoingRecord,
    Rejected,
    encode_dead_letter,
    encode_prediction,
    minimal_dead_letter,
    published_rows,
    record_size,
)
from stream_classifier.stream.compute import ComputeWorker, Result
from stream_classifier.stream.delivery import _TRANSACTION_TIMEOUT_S, close_quietly, make_delivery
from stream_classifier.stream.offsets import OffsetTracker, Pending
from stream_classifier.stream.pauses import Pauses
from stream_classifier.transport.base import Consumer, Partition, Producer, Record, Transport

logger = logging.getLogger(__name__)

_PIPELINE_DEPTH = 3  # batches handed to the compute thread and not yet published
_IDLE_POLL_S = 0.1
_RUNNING_POLL_S = 0.05  # while a batch runs, how often the consumer is polled for the next
_REJECTED_MEMORY = 10_000  # inputs whose output the broker refused, dead-lettered when read again

# What a produced record is for, so that a refusal can fall back to the next form.
_OUTPUT, _DEAD_LETTER, _MINIMAL = "output", "dead_letter", "minimal_dead_letter"


@dataclass(frozen=True, slots=True)
class PublishedBatch:
    """What the publish hook sees: the classified messages of one batch, in input order."""

    records: Sequence[Record]
    texts: Sequence[str]
    probabilities: np.ndarray  # (n, k), rows in ``classes`` order
    classes: Sequence[str]
    labels: Sequence[str]  # the predicted label of each message
    model_version: str


# Returns extra records to produce, each with the index (in the batch) of the message it
# belongs to; that message is committed only once its extra records are acknowledged too.
PublishHook = Callable[[PublishedBatch], Iterable[tuple[int, OutgoingRecord]]]


@dataclass(slots=True)
class _Item:
    record: Record
    decoded: Decoded
    entry: Pending


@dataclass(frozen=True, slots=True)
class _Ack:
    entry: Pending
    error: BaseException | None
    timestamp_ms: int | None
    source: Record  # the input the record was made for
    kind: str  # _OUTPUT, _DEAD_LETTER or _MINIMAL
    rejected: Rejected | None  # a dead letter's reason


class StreamService:
    """Classifies the input topics until :meth:`stop`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        runtime: Classifier,
        *,
        metrics: Metrics,
        transport: Transport,
        publish_hook: PublishHook | None = None,
        health: HealthState | None = None,
    ) -> None:
        self._settings = settings
        self._kafka = settings.kafka
        self.metrics = metrics
        self._transport = transport
        self._publish_hook = publish_hook
        # ``serve`` passes the health object its ops server already answers from during the
        # model load (503 then, not connection refused).
        self.health = health or HealthState(settings.metrics.liveness_timeout_s, ready_gauge=metrics.ready)

        self._compute: ComputeWorker[_Item] = ComputeWorker(
            runtime, metrics, depth=_PIPELINE_DEPTH, on_swap=self._swapped
        )
        self._decoder = InputDecoder(settings.input)
        self._batcher: MicroBatcher[_Item] = MicroBatcher(
            settings.batching.max_batch_size, settings.batching.max_wait_ms / 1000
        )
        self._tracker = OffsetTracker()
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._consume_backoff = Backoff("broker")
        self._delivery_backoff = Backoff("delivery")
        self._runtime_backoff = Backoff("runtime", min_s=0.5, max_s=30.0)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._pauses = Pauses(settings.batching.max_in_flight)
        self._rejected: OrderedDict[tuple[Partition, int], Rejected] = OrderedDict()
        self._last_commit = 0.0
        self._next_lag_refresh = 0.0
        self._delivery = make_delivery(settings.processing, self._tracker, metrics, self.health)

        self._announce_model(runtime)
        metrics.preset_topics(self._kafka.input_topics)

    # ------------------------------------------------------------------ public API

    def run(self) -> None:
        """Serve until :meth:`stop`; returns after the graceful shutdown.

        Raises :class:`~stream_classifier.errors.TransportError` when the cluster refuses
        the service for good (credentials, authorisation, a dead-letter topic that takes nothing).
        """
        self._compute.start()
        try:
            if self._connect():
                while not self._stopping.is_set():
                    try:
                        self._tick()
                    except BrokerUnavailableError as exc:
                        delay = self._consume_backoff.failed(exc)
                        with self.health.waiting_on_broker():
                            self._stopping.wait(delay)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (thread- and signal-safe)."""
        self._stopping.set()

    def swap_model(self, runtime: Classifier) -> None:
        """Serve ``runtime`` from the next batch on (thread-safe)."""
        self._compute.swap(runtime)

    @property
    def model_version(self) -> str:
        return self._compute.classifier.version

    @property
    def assignment(self) -> set[Partition]:
        """The input partitions this instance holds now."""
        return self._consumer.assignment() if self._consumer is not None else set()

    @property
    def in_flight(self) -> int:
        """Messages consumed and not yet committed (read from the I/O thread's state)."""
        return self._tracker.in_flight()

    # ------------------------------------------------------------------ rebalance listener

    def on_revoked(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_revoked", partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(False)
        self._release(set(partitions), lost=False)

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_lost", logging.WARNING, partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(False)
        self._release(set(partitions), lost=True)

    def _release(self, partitions: set[Partition], *, lost: bool) -> None:
        consumer, producer = self._consumer, self._producer
        committed = False
        if consumer is not None and producer is not None:
            committed = self._delivery.releasing(partitions, consumer, producer, self, lost=lost)
        self._forget(partitions, settled=committed)

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_assigned", partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(True)
        for topic, partition in partitions:
            self.metrics.consumer_lag.labels(topic=topic, partition=str(partition))
        self._pauses.assigned(set(partitions))
        self._apply_pauses(time.monotonic())
        self._next_lag_refresh = 0.0

    # ------------------------------------------------------------------ I/O thread

    def _connect(self) -> bool:
        """Create the clients, retrying transient failures until connected or stopped."""
        while not self._stopping.is_set():
            try:
                with self.health.waiting_on_broker():
                    if self._producer is None:
                        self._producer = self._delivery.producer(self._transport)
                    if self._consumer is None:
                        self._consumer = self._transport.consumer(
                            read_committed=self._delivery.read_committed
                        )
                        self._consumer.subscribe(self._kafka.input_topics, self)
                self.health.set_producer_connected(True)
                self._consume_backoff.ok()
                log_event(
                    logger, "service_started", topics=self._kafka.input_topics, group=self._kafka.group_id
                )
                return True
            except BrokerUnavailableError as exc:
                delay = self._consume_backoff.failed(exc)
                with self.health.waiting_on_broker():
                    self._stopping.wait(delay)
        return False

    def _tick(self) -> None:
        if self._delivery.needs_reconnect:
            self._reconnect_clients()
            if self._consumer is None:  # stopped while reconnecting
                return
        self.health.tick()
        self._drain_results(block=bool(self._compute.outstanding), timeout_s=self._wait_s(time.monotonic()))
        self._drain_acks()
        self._commit_if_due()
        in_flight = self._apply_backpressure()
        now = time.monotonic()
        self._apply_pauses(now)
        records = self._poll(now, in_flight)
        now = time.monotonic()
        if records:
            self._accept(records, now)
        self._submit_batches(now, everything=False)
        if now >= self._next_lag_refresh:
            self._refresh_lag()
            self._next_lag_refresh = now + self._settings.metrics.lag_refresh_s

    def _wait_s(self, now: float) -> float:
        """How long the I/O thread may wait for its next event before it has work to do.

        While batches run it waits on their results (a result wakes it at once) and polls the
        consumer only between waits, without blocking: each Kafka poll costs about a
        millisecond of CPU in the client's threads, which on a small CPU is the model's time.
        A full pipeline accepts nothing until a result comes, so it waits the longest.
        """
        if self._compute.full:
            return _IDLE_POLL_S
        longest = _RUNNING_POLL_S if self._compute.outstanding else _IDLE_POLL_S
        until_due = self._batcher.seconds_until_due(now)
        return longest if until_due is None else min(longest, until_due)

    def _poll(self, now: float, in_flight: int) -> list[Record]:
        assert self._consumer is not None
        timeout = 0.0 if self._compute.outstanding else self._wait_s(now)
        room = self._settings.batching.max_in_flight - in_flight
        try:
            records = self._consumer.poll(timeout, max(1, min(self._kafka.max_poll_records, room)))
        except UnreadableRecordError as exc:
            self._skip_unreadable(exc)
            return []
        self._consume_backoff.ok()
        return records

    def _skip_unreadable(self, exc: UnreadableRecordError) -> None:
        """Dead-letter the coordinates of a record the client cannot parse, and read on after it."""
        assert self._consumer is not None
        tp = Partition(exc.topic, exc.partition)
        log_event(
            logger, "unreadable_record", logging.WARNING, partition=f"{tp[0]}:{tp[1]}", offset=exc.offset
        )
        if tp not in self._consumer.assignment():
            return
        record = Record(exc.topic, exc.partition, exc.offset, None, None, (), None)
        entry = self._tracker.track(tp, exc.offset)
        self.metrics.messages_consumed.labels(topic=exc.topic).inc()
        self.metrics.dead_letters.labels(reason=UNREADABLE_RECORD).inc()
        rejected = Rejected(UNREADABLE_RECORD, str(exc))
        self._send(
            minimal_dead_letter(record, rejected, self._kafka.dead_letter_topic), entry, record, _MINIMAL
        )
        entry.seal()
        self._tracker.settle(entry)
        self._consumer.seek(tp, exc.offset + 1)

    def _accept(self, records: list[Record], now: float) -> None:
        per_topic: Counter[str] = Counter()
        for record in records:
            per_topic[record.topic] += 1
            entry = self._tracker.track(record.tp, record.offset)
            decoded = self._rejected.get((record.tp, record.offset)) or self._decoder.decode(record)
            if isinstance(decoded, Rejected):
                self._dead_letter(record, decoded, entry)
                entry.seal()
                self._tracker.settle(entry)
            else:
                self._batcher.add(_Item(record, decoded, entry), now)
        for topic, count in per_topic.items():
            self.metrics.messages_consumed.labels(topic=topic).inc(count)

    def _submit_batches(self, now: float, *, everything: bool) -> None:
        """Hand due batches (all batched items when ``everything``) to the compute thread."""
        while not self._compute.full and len(self._batcher) and (everything or self._batcher.due(now)):
            items = self._batcher.take()
            self._compute.submit(items, [item.decoded.text for item in items])

    def _drain_results(self, *, block: bool, timeout_s: float = 0.0) -> None:
        while (result := self._compute.take(block=block, timeout_s=timeout_s)) is not None:
            if result.broken is not None:
                self._runtime_broken(result)
            else:
                if self._runtime_backoff.failing:
                    self._runtime_backoff.ok()
                    self.health.set_model_loaded(True)
                self._publish(result)
            block = False

    def _runtime_broken(self, result: Result[_Item]) -> None:
        """Re-read the batch later, with every partition paused for a growing backoff.

        A batch whose messages were all rewound already (queued behind the first broken one)
        is stale and counts for nothing.
        """
        current = {item.record.tp for item in result.items if self._tracker.is_current(item.entry)}
        if not current:
            return
        self.metrics.runtime_failures.inc()
        delay = self._runtime_backoff.failed(result.broken or "")
        self.health.set_model_loaded(False)
        for tp in current:
            self._rewind(tp)
        self._pauses.hold_all(time.monotonic() + delay)

    def _publish(self, result: Result[_Item]) -> None:
        classes = result.classifier.labels
        version = result.classifier.version
        topic = self._kafka.output_topic
        predicted: Counter[str] = Counter()
        published: list[int] = []
        labels: list[str] = []
        rows, best = published_rows(result.probabilities)
        for index, item in enumerate(result.items):
            if not self._tracker.is_current(item.entry):
                continue  # its partition was revoked or rewound: it will be read again
            failure = result.failed.get(index)
            if failure is not None:
                self._dead_letter(item.record, Rejected(INFERENCE_FAILED, failure), item.entry)
                continue
            out, label, confidence = encode_prediction(
                item.record,
                id_=item.decoded.id,
                labels=classes,
                row=rows[index],
                best=best[index],
                model_version=version,
                topic=topic,
            )
            if not self._send(out, item.entry, item.record, _OUTPUT, item.record.timestamp_ms):
                continue
            predicted[label] += 1
            self.metrics.confidence.observe(confidence)
            published.append(index)
            labels.append(label)
        if self._publish_hook is not None and published:
            self._run_hook(result, published, labels)
        for item in result.items:
            item.entry.seal()
            self._tracker.settle(item.entry)
        for label, count in predicted.items():
            self.metrics.predictions.labels(label=label).inc(count)

    def _run_hook(self, result: Result[_Item], published: list[int], labels: list[str]) -> None:
        assert self._publish_hook is not None
        items = [result.items[i] for i in published]
        batch = PublishedBatch(
            records=[item.record for item in items],
            texts=[item.decoded.text for item in items],
            probabilities=result.probabilities[published],
            classes=result.classifier.labels,
            labels=labels,
            model_version=result.classifier.version,
        )
        try:
            extras = list(self._publish_hook(batch))
        except Exception as exc:
            log_event(logger, "publish_hook_failed", logging.ERROR, error=repr(exc))
            return
        for index, record in extras:
            self._send(record, items[index].entry, items[index].record, _OUTPUT)

    def _dead_letter(self, record: Record, rejected: Rejected, entry: Pending) -> None:
        out = encode_dead_letter(
            record, rejected, self._kafka.dead_letter_topic, self._kafka.max_request_size
        )
        self.metrics.dead_letters.labels(reason=rejected.reason).inc()
        self._send(out, entry, record, _DEAD_LETTER, rejected=rejected)

    def _send(
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
        assert self._producer is not None
        size = record_size(out.key, out.value, out.headers)
        if size > self._kafka.max_request_size:
            message = f"the output is {size} bytes; kafka.max_request_size is {self._kafka.max_request_size}"
            self._replace_refused(entry, source, kind, rejected, Rejected(OUTPUT_TOO_LARGE, message))
            return False
        acks = self._acks
        entry.sent()
        self._delivery.sending(self._producer)

        def delivered(error: BaseException | None) -> None:
            acks.put(_Ack(entry, error, timestamp_ms, source, kind, rejected))

        try:
            self._producer.send(out.topic, out.value, key=out.key, headers=out.headers, on_delivery=delivered)
        except (BrokerUnavailableError, RecordRejectedError) as exc:
            delivered(exc)
        return True

    def _replace_refused(
        self, entry: Pending, source: Record, kind: str, rejected: Rejected | None, why: Rejected
    ) -> None:
        """Send the next form of a record the broker will not take: output -> dead letter -> minimal."""
        if kind == _OUTPUT:
            self._remember_rejection(source, why)
            self._dead_letter(source, why, entry)
        elif kind == _DEAD_LETTER:
            reason = rejected or why
            letter = Rejected(reason.reason, f"{reason.message} (full dead letter refused: {why.message})")
            self._send(
                minimal_dead_letter(source, letter, self._kafka.dead_letter_topic), entry, source, _MINIMAL
            )
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

    def _drain_acks(self) -> None:
        assert self._producer is not None
        self._producer.poll(0)
        now_ms = time.time() * 1000
        delivered = False
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                if delivered:
                    self.health.producer_acknowledged()
                return
            entry = ack.entry
            delivered = delivered or ack.error is None
            if not self._tracker.is_current(entry):
                continue
            if ack.error is None:
                entry.acknowledged()
                self._tracker.settle(entry)
                self._delivery_backoff.ok()
                if ack.timestamp_ms is not None and ack.timestamp_ms > 0:
                    self.metrics.end_to_end_latency.observe(max(0.0, (now_ms - ack.timestamp_ms) / 1000))
                continue
            self.metrics.produce_errors.inc()
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
            self.health.set_producer_connected(False)
            self._rewind(partition)
            self._pauses.hold(partition, time.monotonic() + self._delivery_backoff.failed(ack.error))

    def _rewind(self, partition: Partition) -> None:
        """Re-read ``partition`` from its oldest pending message; its commit point stays."""
        resume = self._tracker.rewind(partition)
        if resume is None:
            return
        self._batcher.drop(lambda item: item.record.tp == partition)
        if self._consumer is not None and partition in self._consumer.assignment():
            self._consumer.seek(partition, resume)

    def _forget(self, partitions: set[Partition], *, settled: bool = False) -> None:
        """Drop the in-flight work of ``partitions`` uncommitted, so that it is read again.

        A partition this consumer still holds (kafka-python revoked and re-assigned it,
        keeping its fetch position) is sought back to its oldest dropped message; one that
        moved elsewhere is read by its new owner from the committed offset. ``settled``: the
        delivery strategy committed all their work (nothing is pending), so their state goes
        and nothing is sought, whether or not the consumer still lists them (librdkafka does
        inside ``on_revoke``).
        """
        resume = {tp: self._tracker.resume_point(tp) for tp in partitions}
        held = self._consumer.assignment() if self._consumer is not None and not settled else set()
        # A held partition with nothing pending keeps its state (and its uncommitted commit point).
        stale = {tp for tp in partitions if tp not in held or resume[tp] is not None}
        self._tracker.drop(stale)
        self._batcher.drop(lambda item: item.record.tp in stale)
        for tp in stale:
            offset = resume[tp]
            if offset is not None and tp in held and self._consumer is not None:
                self._consumer.seek(tp, offset)
            self._pauses.release(tp)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def _commit_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_commit >= self._delivery.interval_s:
            self._commit(now + _TRANSACTION_TIMEOUT_S)
            self._last_commit = now

    def _commit(self, deadline: float) -> None:
        assert self._consumer is not None and self._producer is not None
        self._delivery.commit(self._consumer, self._producer, self, deadline)

    def settle(self, deadline: float) -> bool:
        """Run, publish and acknowledge everything consumed by ``deadline`` (the barrier)."""
        while (len(self._batcher) or self._compute.outstanding) and time.monotonic() < deadline:
            self._submit_batches(time.monotonic(), everything=True)
            self._drain_results(block=True, timeout_s=max(0.0, min(0.5, deadline - time.monotonic())))
            self._drain_acks()
        flushed = self._flush(max(0.0, deadline - time.monotonic()))
        self._drain_acks()
        return flushed and not self._tracker.unsettled()

    def undo(self) -> None:
        """Drop all uncommitted work and re-read each held partition from its restart point."""
        assert self._consumer is not None
        partitions = set(self._tracker.partitions())
        restart = {tp: self._tracker.restart_point(tp) for tp in partitions}
        held = self._consumer.assignment()
        self._tracker.drop(partitions)
        self._batcher.drop(lambda item: True)
        for tp, offset in restart.items():
            if offset is not None and tp in held:
                self._consumer.seek(tp, offset)

    def _reconnect_clients(self) -> None:
        """Drop all in-flight state and rejoin: consumption resumes from the committed offsets.

        Every partition's state goes, commit points included: one reached inside the aborted
        transaction was never committed.
        """
        self._delivery.reconnecting()
        self._forget(set(self._tracker.partitions()))
        self._tracker.drop(set(self._tracker.partitions()))
        while self._compute.outstanding:  # stale now: drained, not published
            self._drain_results(block=True, timeout_s=_TRANSACTION_TIMEOUT_S)
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        self.health.set_producer_connected(False)
        self.health.set_consumer_joined(False)
        self._pauses.clear()
        if consumer is not None:
            close_quietly(consumer.close)
        if producer is not None:
            close_quietly(lambda: producer.close(1.0))
        self._connect()

    def _flush(self, timeout_s: float) -> bool:
        assert self._producer is not None
        with self.health.waiting_on_broker():
            return self._producer.flush(timeout_s)

    def _apply_backpressure(self) -> int:
        in_flight = self._tracker.in_flight()
        self.metrics.in_flight.set(in_flight)
        self._pauses.backpressure(in_flight)
        return in_flight

    def _apply_pauses(self, now: float) -> None:
        if self._consumer is not None:
            self._pauses.apply(self._consumer, now)

    def _refresh_lag(self) -> None:
        assert self._consumer is not None
        assigned = sorted(self._consumer.assignment())
        if not assigned:
            return
        try:
            with self.health.waiting_on_broker():
                ends = self._consumer.end_offsets(assigned)
                positions = {tp: self._consumer.position(tp) for tp in assigned}
        except BrokerUnavailableError as exc:
            log_event(logger, "lag_refresh_failed", logging.DEBUG, error=str(exc))
            return
        for tp in assigned:
            lag = max(0, ends.get(tp, 0) - positions[tp])
            self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self._settings.processing.shutdown_timeout_s
        log_event(logger, "service_stopping", in_flight=self._tracker.in_flight())
        try:
            if self._consumer is not None and self._producer is not None:
                self.settle(deadline)
                self._commit(deadline)
        finally:
            self.health.set_consumer_joined(False)
            self.health.set_producer_connected(False)
            consumer, producer = self._consumer, self._producer
            if consumer is not None:
                close_quietly(consumer.close)
            if producer is not None:
                close_quietly(lambda: producer.close(max(0.0, deadline - time.monotonic())))
            self._compute.stop(max(0.0, deadline - time.monotonic()))
            log_event(logger, "service_stopped", uncommitted=self._tracker.in_flight())

    # ------------------------------------------------------------------ the model

    def _swapped(self, old: Classifier, new: Classifier) -> None:
        """Runs on the compute thread, between batches."""
        self._announce_model(new)
        self.metrics.model_swaps.inc()
        log_event(logger, "model_swapped", old_version=old.version, new_version=new.version)

    def _announce_model(self, runtime: Classifier) -> None:
        self.metrics.model_info.info(
            {
                "version": runtime.version,
                "base_model": runtime.base_model,
                "device": str(runtime.device),
                "precision": str(runtime.precision),
            }
        )
        self.metrics.preset_labels(runtime.labels)
        self.health.set_model_loaded(True)
