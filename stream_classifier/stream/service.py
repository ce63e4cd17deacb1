"""The serving loop: poll, decode, micro-batch, infer, publish, commit.

Two threads share the work:

- the **I/O thread** (the caller of :meth:`StreamService.run`) polls, decodes, batches,
  tokenises (``runtime.prepare``), encodes and produces outputs and dead letters, and
  commits offsets; it alone touches the consumer, the producer and the offset tracker;
- the **compute thread** only runs ``runtime.infer``.

Invariants (ARCHITECTURE.md names this module for them):

- **The model is never idle while other work waits.** The I/O thread keeps up to
  ``_PIPELINE_DEPTH`` prepared batches queued ahead of the compute thread, so whenever a
  batch is due the model starts it as soon as it finishes the previous one; decoding,
  tokenising, encoding and producing overlap with inference.
- **Offsets** (at-least-once). A partition's offset is committed only when every record
  for that message and all earlier ones in the partition was acknowledged by the producer
  (see :mod:`stream_classifier.stream.offsets`). A failed delivery rewinds its partition to
  the oldest unacknowledged message and re-reads it.
- **Ordering.** Batches leave the compute thread in the order they entered, and each batch
  is produced in input order by one producer with idempotence on, so outputs of one input
  partition come out in input order (a rewind re-emits from the rewound message onwards).
- **The model reference.** Only :meth:`StreamService.swap_model` replaces it, and the
  compute thread applies the swap between batches; each output names the version that
  computed it.
- **Bounded state.** At most ``batching.max_in_flight`` messages are consumed and not yet
  committed: above it the consumer pauses (it never drops); the compute queue holds at most
  ``_PIPELINE_DEPTH`` batches.
- **Rebalance.** On revoke (or loss), the in-flight messages of those partitions are dropped
  uncommitted: results still to come for them are discarded, and they are read again — by
  the next owner from the committed offset, or, for a partition this instance still holds
  (kafka-python keeps the fetch position of a partition revoked and re-assigned to the same
  member), after a seek back to the oldest dropped message. Nothing is lost; up to the
  in-flight messages of a revoked partition may be published twice. (kafka-python reports a
  revocation only after it happened, so committing "just before" is not available.) On
  assign, consumption starts at the committed offsets.
- **Shutdown** (:meth:`StreamService.stop`, e.g. on SIGTERM): stop polling, run what is
  batched, publish, flush, commit, leave the group, within ``processing.shutdown_timeout_s``.
- **Exactly-once** (``processing.guarantee: exactly_once``). Outputs, dead letters and the
  consumed offsets go into one Kafka transaction (``send_offsets_to_transaction``), so a
  ``read_committed`` reader sees each output once, crash or not. A commit is a barrier:
  everything consumed so far is run, published and acknowledged first, then the offsets
  are added and the transaction committed — at most every ``commit_interval_ms``
  (>= ``_MIN_TRANSACTION_INTERVAL_S``), on revoke and on shutdown. If a transaction fails,
  it is aborted, all in-flight state is dropped and the clients reconnect: consumption
  resumes from the last committed transaction. Each process has its own transactional id
  (prefix + random suffix); the open transaction of a crashed process is aborted by the
  broker after the producer's transaction timeout, and fencing of stale members relies on
  the consumer group metadata (KIP-447).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stream_classifier.config import Settings
from stream_classifier.errors import BrokerUnavailableError
from stream_classifier.model.runtime import ModelRuntime, PreparedBatch
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.batcher import MicroBatcher
from stream_classifier.stream.codec import (
    INFERENCE_FAILED,
    Decoded,
    InputDecoder,
    OutgoingRecord,
    Rejected,
    encode_dead_letter,
    encode_prediction,
    published_rows,
)
from stream_classifier.stream.offsets import OffsetTracker, Pending
from stream_classifier.transport import Consumer, Partition, Producer, Record, Transport

logger = logging.getLogger(__name__)

_PIPELINE_DEPTH = 3  # batches handed to the compute thread and not yet published
_IDLE_POLL_S = 0.1
_RUNNING_POLL_S = 0.05  # while a batch runs, how often the consumer is polled for the next
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0
_MIN_TRANSACTION_INTERVAL_S = 0.1
_TRANSACTION_TIMEOUT_S = 30.0


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


@dataclass(slots=True)
class _Job:
    items: list[_Item]
    runtime: ModelRuntime
    prepared: PreparedBatch | None


@dataclass(slots=True)
class _Result:
    items: list[_Item]
    probabilities: np.ndarray
    failed: dict[int, str]
    runtime: ModelRuntime


class _BrokerState:
    """Backoff for transient broker errors; logs once per change of state, not per retry."""

    def __init__(self) -> None:
        self.available = True
        self.backoff_s = 0.0

    def ok(self) -> None:
        if not self.available:
            log_event(logger, "broker_available")
        self.available = True
        self.backoff_s = 0.0

    def failed(self, exc: BaseException) -> float:
        if self.available:
            log_event(logger, "broker_unavailable", logging.WARNING, error=str(exc))
        self.available = False
        self.backoff_s = min(_BACKOFF_MAX_S, max(_BACKOFF_MIN_S, self.backoff_s * 2))
        return self.backoff_s


class StreamService:
    """Classifies the input topics until :meth:`stop`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
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

        self._runtime = runtime
        self._next_runtime: ModelRuntime | None = None
        self._swap_lock = threading.Lock()

        self._decoder = InputDecoder(settings.input)
        self._batcher: MicroBatcher[_Item] = MicroBatcher(
            settings.batching.max_batch_size, settings.batching.max_wait_ms / 1000
        )
        self._tracker = OffsetTracker()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=_PIPELINE_DEPTH)
        self._results: queue.SimpleQueue[_Result | BaseException] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[tuple[Pending, BaseException | None, int | None]] = queue.SimpleQueue()
        self._outstanding = 0  # batches handed to the compute thread, not yet published
        self._paused = False
        self._stopping = threading.Event()
        self._broker = _BrokerState()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._last_commit = 0.0
        self._commit_failing = False  # logs once per change of state, not once per retry
        self._next_lag_refresh = 0.0
        self._exactly_once = settings.processing.guarantee == "exactly_once"
        self._in_transaction = False
        self._reconnect = False  # set when an aborted transaction left the clients' state behind

        self._announce_model(runtime)
        metrics.preset_topics(self._kafka.input_topics)

    # ------------------------------------------------------------------ public API

    def run(self) -> None:
        """Serve until :meth:`stop`; returns after the graceful shutdown."""
        compute = threading.Thread(target=self._compute_loop, name="stream-compute", daemon=True)
        compute.start()
        try:
            if self._connect():
                while not self._stopping.is_set():
                    try:
                        self._tick()
                        self._broker.ok()
                    except BrokerUnavailableError as exc:
                        self._stopping.wait(self._broker.failed(exc))
        finally:
            self._shutdown(compute)

    def stop(self) -> None:
        """Ask :meth:`run` to finish (thread- and signal-safe)."""
        self._stopping.set()

    def swap_model(self, runtime: ModelRuntime) -> None:
        """Serve ``runtime`` from the next batch on (thread-safe)."""
        with self._swap_lock:
            self._next_runtime = runtime

    @property
    def model_version(self) -> str:
        return self._runtime.version

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
        self._forget(set(partitions))

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_lost", logging.WARNING, partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(False)
        self._forget(set(partitions))

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_assigned", partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(True)
        for topic, partition in partitions:
            self.metrics.consumer_lag.labels(topic=topic, partition=str(partition))
        if self._paused and self._consumer is not None:
            self._consumer.pause(partitions)
        self._next_lag_refresh = 0.0

    # ------------------------------------------------------------------ I/O thread

    def _connect(self) -> bool:
        """Create the clients, retrying transient failures until connected or stopped."""
        while not self._stopping.is_set():
            try:
                with self.health.waiting_on_broker():
                    if self._producer is None:
                        self._producer = self._make_producer()
                    if self._consumer is None:
                        self._consumer = self._transport.consumer(read_committed=self._exactly_once)
                        self._consumer.subscribe(self._kafka.input_topics, self)
                self.health.set_producer_connected(True)
                self._broker.ok()
                log_event(
                    logger, "service_started", topics=self._kafka.input_topics, group=self._kafka.group_id
                )
                return True
            except BrokerUnavailableError as exc:
                self._stopping.wait(self._broker.failed(exc))
        return False

    def _make_producer(self) -> Producer:
        if not self._exactly_once:
            return self._transport.producer()
        transactional_id = f"{self._settings.processing.transactional_id_prefix}-{uuid.uuid4().hex[:12]}"
        producer = self._transport.producer(transactional_id=transactional_id)
        try:
            producer.init_transactions(_TRANSACTION_TIMEOUT_S)
        except BaseException:
            self._close(lambda: producer.close(1.0))
            raise
        log_event(logger, "transactions_initialised", transactional_id=transactional_id)
        return producer

    def _tick(self) -> None:
        if self._reconnect:
            self._reconnect_clients()
            if self._consumer is None:  # stopped while reconnecting
                return
        self.health.tick()
        self._drain_results(block=bool(self._outstanding), timeout_s=self._wait_s(time.monotonic()))
        self._drain_acks()
        self._commit_if_due()
        in_flight = self._apply_backpressure()
        now = time.monotonic()
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
        if self._outstanding >= _PIPELINE_DEPTH:
            return _IDLE_POLL_S
        longest = _RUNNING_POLL_S if self._outstanding else _IDLE_POLL_S
        until_due = self._batcher.seconds_until_due(now)
        return longest if until_due is None else min(longest, until_due)

    def _poll(self, now: float, in_flight: int) -> list[Record]:
        assert self._consumer is not None
        timeout = 0.0 if self._outstanding else self._wait_s(now)
        room = self._settings.batching.max_in_flight - in_flight
        return self._consumer.poll(timeout, max(1, min(self._kafka.max_poll_records, room)))

    def _accept(self, records: list[Record], now: float) -> None:
        per_topic: Counter[str] = Counter()
        for record in records:
            per_topic[record.topic] += 1
            entry = self._tracker.track(record.tp, record.offset)
            decoded = self._decoder.decode(record)
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
        while (
            self._outstanding < _PIPELINE_DEPTH
            and len(self._batcher)
            and (everything or self._batcher.due(now))
        ):
            items = self._batcher.take()
            runtime = self._runtime
            try:
                prepared: PreparedBatch | None = runtime.prepare([item.decoded.text for item in items])
            except Exception as exc:  # the compute thread isolates the failing messages
                log_event(logger, "prepare_failed", logging.WARNING, error=repr(exc), batch=len(items))
                prepared = None
            self._jobs.put(_Job(items, runtime, prepared))
            self._outstanding += 1

    def _drain_results(self, *, block: bool, timeout_s: float = 0.0) -> None:
        while self._outstanding:
            try:
                result = (
                    self._results.get(block=block, timeout=timeout_s) if block else self._results.get_nowait()
                )
            except queue.Empty:
                return
            self._outstanding -= 1
            if isinstance(result, BaseException):
                raise result
            self._publish(result)
            block = False

    def _publish(self, result: _Result) -> None:
        runtime = result.runtime
        classes = runtime.labels
        version = runtime.version
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
            self._send(out, item.entry, item.record.timestamp_ms)
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

    def _run_hook(self, result: _Result, published: list[int], labels: list[str]) -> None:
        assert self._publish_hook is not None
        items = [result.items[i] for i in published]
        batch = PublishedBatch(
            records=[item.record for item in items],
            texts=[item.decoded.text for item in items],
            probabilities=result.probabilities[published],
            classes=result.runtime.labels,
            labels=labels,
            model_version=result.runtime.version,
        )
        try:
            extras = list(self._publish_hook(batch))
        except Exception as exc:
            log_event(logger, "publish_hook_failed", logging.ERROR, error=repr(exc))
            return
        for index, record in extras:
            self._send(record, items[index].entry, None)

    def _dead_letter(self, record: Record, rejected: Rejected, entry: Pending) -> None:
        out = encode_dead_letter(
            record, rejected, self._kafka.dead_letter_topic, self._kafka.max_request_size
        )
        self.metrics.dead_letters.labels(reason=rejected.reason).inc()
        self._send(out, entry, None)

    def _send(self, out: OutgoingRecord, entry: Pending, timestamp_ms: int | None) -> None:
        assert self._producer is not None
        acks = self._acks
        entry.sent()
        if self._exactly_once and not self._in_transaction:
            self._producer.begin_transaction()
            self._in_transaction = True

        def delivered(error: BaseException | None) -> None:
            acks.put((entry, error, timestamp_ms))

        try:
            self._producer.send(out.topic, out.value, key=out.key, headers=out.headers, on_delivery=delivered)
        except BrokerUnavailableError as exc:
            delivered(exc)

    def _drain_acks(self) -> None:
        assert self._producer is not None
        self._producer.poll(0)
        now_ms = time.time() * 1000
        while True:
            try:
                entry, error, timestamp_ms = self._acks.get_nowait()
            except queue.Empty:
                return
            if not self._tracker.is_current(entry):
                continue
            if error is not None:
                self.metrics.produce_errors.inc()
                self._rewind(entry.owner.partition, error)
                continue
            entry.acknowledged()
            self._tracker.settle(entry)
            if timestamp_ms is not None and timestamp_ms > 0:
                self.metrics.end_to_end_latency.observe(max(0.0, (now_ms - timestamp_ms) / 1000))

    def _rewind(self, partition: Partition, error: BaseException) -> None:
        """Re-read ``partition`` from its oldest unacknowledged message (a delivery failed)."""
        log_event(
            logger,
            "delivery_failed",
            logging.WARNING,
            partition=f"{partition[0]}:{partition[1]}",
            resume_offset=self._tracker.resume_point(partition),
            error=repr(error),
        )
        self._forget({partition})
        self._stopping.wait(self._broker.failed(error))

    def _forget(self, partitions: set[Partition]) -> None:
        """Drop the in-flight work of ``partitions`` uncommitted, so that it is read again.

        A partition this consumer still holds (a delivery failed, or kafka-python revoked and
        re-assigned it, keeping its fetch position) is sought back to its oldest dropped
        message; one that moved elsewhere is read by its new owner from the committed offset.
        """
        resume = {tp: self._tracker.resume_point(tp) for tp in partitions}
        held = self._consumer.assignment() if self._consumer is not None else set()
        # A held partition with nothing pending keeps its state (and its uncommitted commit point).
        stale = {tp for tp in partitions if tp not in held or resume[tp] is not None}
        self._tracker.drop(stale)
        self._batcher.drop(lambda item: item.record.tp in stale)
        for tp in stale:
            offset = resume[tp]
            if offset is not None and tp in held and self._consumer is not None:
                self._consumer.seek(tp, offset)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def _commit_if_due(self) -> None:
        now = time.monotonic()
        interval_s = self._settings.processing.commit_interval_ms / 1000
        if self._exactly_once:
            interval_s = max(interval_s, _MIN_TRANSACTION_INTERVAL_S)
        if now - self._last_commit >= interval_s:
            self._commit()
            self._last_commit = now

    def _commit(self) -> None:
        assert self._consumer is not None
        if self._exactly_once:
            self._commit_transaction()
            return
        offsets = self._tracker.to_commit()
        if not offsets:
            return
        try:
            with self.health.waiting_on_broker():
                self._consumer.commit(offsets)
        except BrokerUnavailableError as exc:
            # Retried on the next turn (the loop keeps polling, so rebalances are still seen).
            self.metrics.commit_errors.inc()
            if not self._commit_failing:
                log_event(logger, "commit_failed", logging.WARNING, error=str(exc))
            self._commit_failing = True
            return
        self._tracker.committed(offsets)
        if self._commit_failing:
            log_event(logger, "commit_recovered")
        self._commit_failing = False

    def _commit_transaction(self) -> None:
        """Barrier: run, publish and acknowledge everything consumed; then commit it atomically."""
        assert self._consumer is not None and self._producer is not None
        if not self._in_transaction:
            return
        while len(self._batcher) or self._outstanding:
            self._submit_batches(time.monotonic(), everything=True)
            self._drain_results(block=True, timeout_s=0.5)
            self._drain_acks()
        flushed = self._flush(_TRANSACTION_TIMEOUT_S)
        self._drain_acks()
        offsets = self._tracker.to_commit()
        try:
            if not flushed or self._tracker.in_flight():
                raise BrokerUnavailableError("not every record of the transaction was acknowledged")
            with self.health.waiting_on_broker():
                if offsets:
                    self._producer.send_offsets_to_transaction(
                        offsets, self._consumer, _TRANSACTION_TIMEOUT_S
                    )
                self._producer.commit_transaction(_TRANSACTION_TIMEOUT_S)
        except BrokerUnavailableError as exc:
            self._abort_transaction(exc)
            return
        self._in_transaction = False
        self._tracker.committed(offsets)

    def _abort_transaction(self, error: BaseException) -> None:
        """Undo the open transaction; what it covered is re-read after reconnecting."""
        assert self._producer is not None
        self.metrics.commit_errors.inc()
        log_event(logger, "transaction_aborted", logging.WARNING, error=str(error))
        producer = self._producer
        self._close(lambda: producer.abort_transaction(_TRANSACTION_TIMEOUT_S))
        self._in_transaction = False
        self._reconnect = True

    def _reconnect_clients(self) -> None:
        """Drop all in-flight state and rejoin: consumption resumes from the committed offsets."""
        self._reconnect = False
        self._forget(set(self._tracker.partitions()))
        while self._outstanding:  # stale now: drained, not published
            self._drain_results(block=True, timeout_s=_TRANSACTION_TIMEOUT_S)
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        if consumer is not None:
            self._close(consumer.close)
        if producer is not None:
            self._close(lambda: producer.close(1.0))
        self._connect()

    def _flush(self, timeout_s: float) -> bool:
        assert self._producer is not None
        with self.health.waiting_on_broker():
            return self._producer.flush(timeout_s)

    def _apply_backpressure(self) -> int:
        assert self._consumer is not None
        in_flight = self._tracker.in_flight()
        self.metrics.in_flight.set(in_flight)
        limit = self._settings.batching.max_in_flight
        if not self._paused and in_flight >= limit:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            log_event(logger, "consumption_paused", in_flight=in_flight)
        elif self._paused and in_flight <= limit // 2:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
            log_event(logger, "consumption_resumed", in_flight=in_flight)
        return in_flight

    def _refresh_lag(self) -> None:
        assert self._consumer is not None
        assigned = sorted(self._consumer.assignment())
        if not assigned:
            return
        try:
            ends = self._consumer.end_offsets(assigned)
            for tp in assigned:
                lag = max(0, ends.get(tp, 0) - self._consumer.position(tp))
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
        except BrokerUnavailableError as exc:
            log_event(logger, "lag_refresh_failed", logging.DEBUG, error=str(exc))

    def _shutdown(self, compute: threading.Thread) -> None:
        deadline = time.monotonic() + self._settings.processing.shutdown_timeout_s
        log_event(logger, "service_stopping", in_flight=self._tracker.in_flight())
        try:
            if self._consumer is not None and self._producer is not None:
                while (len(self._batcher) or self._outstanding) and time.monotonic() < deadline:
                    self._submit_batches(time.monotonic(), everything=True)
                    self._drain_results(block=True, timeout_s=max(0.0, min(0.5, deadline - time.monotonic())))
                    self._drain_acks()
                self._flush(max(0.0, deadline - time.monotonic()))
                self._drain_acks()
                self._commit()
        finally:
            with contextlib.suppress(queue.Full):
                self._jobs.put_nowait(None)
            self.health.set_consumer_joined(False)
            self.health.set_producer_connected(False)
            consumer, producer = self._consumer, self._producer
            if consumer is not None:
                self._close(consumer.close)
            if producer is not None:
                self._close(lambda: producer.close(max(0.0, deadline - time.monotonic())))
            compute.join(timeout=max(0.0, deadline - time.monotonic()))
            log_event(logger, "service_stopped", uncommitted=self._tracker.in_flight())

    @staticmethod
    def _close(close: Callable[[], object]) -> None:
        try:
            close()
        except Exception as exc:
            log_event(logger, "close_failed", logging.WARNING, error=repr(exc))

    # ------------------------------------------------------------------ compute thread

    def _compute_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._results.put(self._infer(job))
            except BaseException as exc:  # a bug: hand it to the I/O thread, which raises it
                self._results.put(exc)

    def _current_runtime(self) -> ModelRuntime:
        with self._swap_lock:
            incoming, self._next_runtime = self._next_runtime, None
        if incoming is not None and incoming is not self._runtime:
            old = self._runtime.version
            self._runtime = incoming
            self._announce_model(incoming)
            self.metrics.model_swaps.inc()
            log_event(logger, "model_swapped", old_version=old, new_version=incoming.version)
        return self._runtime

    def _infer(self, job: _Job) -> _Result:
        runtime = self._current_runtime()
        texts = [item.decoded.text for item in job.items]
        started = time.perf_counter()
        try:
            prepared = job.prepared if job.runtime is runtime and job.prepared is not None else None
            probabilities = runtime.infer(prepared if prepared is not None else runtime.prepare(texts))
            failed: dict[int, str] = {}
        except Exception as exc:
            log_event(logger, "batch_inference_failed", logging.WARNING, error=repr(exc), batch=len(texts))
            probabilities, failed = self._infer_one_by_one(runtime, texts)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(texts))
        return _Result(job.items, probabilities, failed, runtime)

    @staticmethod
    def _infer_one_by_one(runtime: ModelRuntime, texts: list[str]) -> tuple[np.ndarray, dict[int, str]]:
        """Isolate the messages that fail alone; the others get their probabilities."""
        probabilities = np.zeros((len(texts), len(runtime.labels)), dtype=np.float32)
        failed: dict[int, str] = {}
        for index, text in enumerate(texts):
            try:
                probabilities[index] = runtime.predict_proba([text])[0]
            except Exception as exc:
                failed[index] = f"inference failed: {type(exc).__name__}: {str(exc)[:200]}"
        return probabilities, failed

    # ------------------------------------------------------------------ metrics

    def _announce_model(self, runtime: ModelRuntime) -> None:
        self.metrics.model_info.info(
            {
                "version": runtime.version,
                "base_model": str(runtime.bundle.metadata.base_model or ""),
                "device": str(runtime.device),
                "precision": str(runtime.precision),
            }
        )
        self.metrics.preset_labels(runtime.labels)
        self.health.set_model_loaded(True)
