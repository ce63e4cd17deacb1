"""The serving loop: poll, decode, micro-batch, infer, publish, commit.

The loop itself is here; its parts are :mod:`.intake` (polled records to batched items),
:mod:`.compute` (the model), :mod:`.output` (a finished batch to records), :mod:`.sender`
(records to acknowledgements), :mod:`.rereads` (work dropped to be read again) and
:mod:`.delivery` (commits).

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
- **No record stops the stream.** A record that cannot be decoded or parsed becomes a dead
  letter with its reason and its partition goes on (:mod:`.intake`); a refused output or
  dead letter falls back to its next form (:mod:`.sender`).
- **Transient failures back off without stopping the loop.** A failed delivery
  (:mod:`.sender`) rewinds its partition to the oldest unacknowledged message (keeping the
  acknowledged prefix committable) and pauses that partition; the loop keeps ticking,
  polling and heartbeating meanwhile.
- **A broken runtime is not a bad message.** When the model itself fails (out of memory, a
  broken model: see :mod:`.compute`), its batch is rewound, consumption pauses for a
  growing backoff and readiness drops; no message is dead-lettered for it.
- **Ordering.** Batches leave the compute thread in the order they entered and are
  published in input order (:mod:`.output`).
- **The model reference.** Only :meth:`StreamService.swap_model` replaces it, between batches.
- **Bounded state.** At most ``batching.max_in_flight`` messages are consumed and not yet
  committed: above it the consumer pauses (it never drops); the compute queue holds at most
  ``_PIPELINE_DEPTH`` batches; :mod:`.sender` bounds the memory of refused inputs.
- **Rebalance.** On revoke (or loss), the delivery strategy commits or aborts those
  partitions' open work, and the rest is dropped uncommitted and read again
  (:mod:`.rereads`). On assign, consumption starts at the committed offsets.
- **Shutdown** (:meth:`StreamService.stop`, e.g. on SIGTERM): stop polling, run what is
  batched, publish, flush, commit, leave the group, within ``processing.shutdown_timeout_s``
  (the exactly-once commit included).
- **Delivery guarantee.** How offsets commit (at-least-once, or exactly-once with
  transactions, including what a revoke commits or aborts) is
  :mod:`stream_classifier.stream.delivery`, picked once; the loop commits through it every
  ``commit_interval_ms``, on revoke and on shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from stream_classifier.config import Settings
from stream_classifier.errors import BrokerUnavailableError, UnreadableRecordError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.backoff import Backoff
from stream_classifier.stream.batcher import MicroBatcher
from stream_classifier.stream.classifier import Classifier
from stream_classifier.stream.compute import ComputeWorker, Result
from stream_classifier.stream.delivery import _TRANSACTION_TIMEOUT_S, close_quietly, make_delivery
from stream_classifier.stream.intake import Intake
from stream_classifier.stream.offsets import OffsetTracker
from stream_classifier.stream.output import Item, PublishedBatch, Publisher, PublishHook
from stream_classifier.stream.pauses import Pauses
from stream_classifier.stream.rereads import Rereads
from stream_classifier.stream.sender import Sender
from stream_classifier.transport.base import Consumer, Partition, Record, Transport

__all__ = ["PublishHook", "PublishedBatch", "StreamService"]  # the hook's types, where callers find them

logger = logging.getLogger(__name__)

_PIPELINE_DEPTH = 3  # batches handed to the compute thread and not yet published
_IDLE_POLL_S = 0.1
_RUNNING_POLL_S = 0.05  # while a batch runs, how often the consumer is polled for the next


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
        # ``serve`` passes the health object its ops server already answers from during the
        # model load (503 then, not connection refused).
        self.health = health or HealthState(settings.metrics.liveness_timeout_s, ready_gauge=metrics.ready)

        self._compute: ComputeWorker[Item] = ComputeWorker(
            runtime, metrics, depth=_PIPELINE_DEPTH, on_swap=self._swapped
        )
        self._batcher: MicroBatcher[Item] = MicroBatcher(
            settings.batching.max_batch_size, settings.batching.max_wait_ms / 1000
        )
        self._tracker = OffsetTracker()
        self._stopping = threading.Event()
        self._consume_backoff = Backoff("broker")
        self._runtime_backoff = Backoff("runtime", min_s=0.5, max_s=30.0)
        self._consumer: Consumer | None = None
        # What the rebalance callbacks last left this instance (swapped whole: read lock-free).
        self._assigned: frozenset[Partition] = frozenset()
        self._pauses = Pauses(settings.batching.max_in_flight)
        self._last_commit = 0.0
        self._next_lag_refresh = 0.0
        self._delivery = make_delivery(settings.processing, self._tracker, metrics, self.health)
        self._sender = Sender(
            settings.kafka,
            self._tracker,
            self._delivery,
            metrics,
            self.health,
            on_failed=self._delivery_failed,
        )
        self._publisher = Publisher(settings, self._tracker, self._sender, metrics, publish_hook)
        keep_original = settings.output.include_input == "original"
        self._intake = Intake(
            settings.input, self._tracker, self._sender, self._batcher, metrics, keep_original=keep_original
        )
        self._rereads = Rereads(self._tracker, self._batcher, self._pauses, metrics)

        self._announce_model(runtime)
        metrics.preset_topics(self._kafka.input_topics, self._publisher.output_topics)

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
        """The input partitions this instance holds now, as the rebalance callbacks last said.
        Never blocks: librdkafka's ``assignment()`` called from another thread waits seconds
        while a rebalance is under way."""
        return set(self._assigned)

    @property
    def in_flight(self) -> int:
        """Messages consumed and not yet committed (read from the I/O thread's state)."""
        return self._tracker.in_flight()

    # ------------------------------------------------------------------ rebalance listener

    def on_revoked(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_revoked", partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(False)
        self._assigned = self._assigned - set(partitions)
        self._release(set(partitions), lost=False)

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_lost", logging.WARNING, partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(False)
        self._assigned = self._assigned - set(partitions)
        self._release(set(partitions), lost=True)

    def _release(self, partitions: set[Partition], *, lost: bool) -> None:
        consumer, producer = self._consumer, self._sender.producer
        committed = False
        if consumer is not None and producer is not None:
            committed = self._delivery.releasing(partitions, consumer, producer, self, lost=lost)
        held = consumer.retained(partitions) if consumer is not None and not committed else set()
        self._rereads.forget(partitions, consumer, held)

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        log_event(logger, "partitions_assigned", partitions=[f"{t}:{p}" for t, p in partitions])
        self.metrics.rebalances.inc()
        self.health.set_consumer_joined(True)
        self._assigned = self._assigned | set(partitions)
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
                    if self._sender.producer is None:
                        self._sender.producer = self._delivery.producer(self._transport)
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
        self._sender.drain()
        self._commit_if_due()
        in_flight = self._apply_backpressure()
        now = time.monotonic()
        self._apply_pauses(now)
        records = self._poll(now, in_flight)
        now = time.monotonic()
        if records:
            self._intake.accept(records, now)
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
            self._intake.unreadable(exc, self._consumer)
            return []
        self._consume_backoff.ok()
        return records

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
                self._publisher.publish(result)
            block = False

    def _runtime_broken(self, result: Result[Item]) -> None:
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
            self._rereads.rewind(tp, self._consumer)
        self._pauses.hold_all(time.monotonic() + delay)

    def _delivery_failed(self, partition: Partition, delay_s: float) -> None:
        """A delivery of ``partition`` failed: re-read it from its oldest pending message, later."""
        self._rereads.rewind(partition, self._consumer)
        self._pauses.hold(partition, time.monotonic() + delay_s)

    def _commit_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_commit >= self._delivery.interval_s:
            self._commit(now + _TRANSACTION_TIMEOUT_S)
            self._last_commit = now

    def _commit(self, deadline: float) -> None:
        assert self._consumer is not None and self._sender.producer is not None
        self._delivery.commit(self._consumer, self._sender.producer, self, deadline)

    def settle(self, deadline: float) -> bool:
        """Run, publish and acknowledge everything consumed by ``deadline`` (the barrier)."""
        while (len(self._batcher) or self._compute.outstanding) and time.monotonic() < deadline:
            self._submit_batches(time.monotonic(), everything=True)
            self._drain_results(block=True, timeout_s=max(0.0, min(0.5, deadline - time.monotonic())))
            self._sender.drain()
        flushed = self._flush(max(0.0, deadline - time.monotonic()))
        self._sender.drain()
        return flushed and not self._tracker.unsettled()

    def undo(self) -> None:
        """Drop all uncommitted work and re-read each held partition from its restart point."""
        assert self._consumer is not None
        self._rereads.undo(self._consumer)

    def _reconnect_clients(self) -> None:
        """Drop all in-flight state and rejoin: consumption resumes from the committed offsets.

        Every partition's state goes, commit points included: one reached inside the aborted
        transaction was never committed.
        """
        self._delivery.reconnecting()
        self._rereads.forget(set(self._tracker.partitions()), self._consumer, held=set())
        self._tracker.drop(set(self._tracker.partitions()))
        while self._compute.outstanding:  # stale now: drained, not published
            self._drain_results(block=True, timeout_s=_TRANSACTION_TIMEOUT_S)
        consumer, producer = self._consumer, self._sender.producer
        self._consumer = self._sender.producer = None
        self._assigned = frozenset()
        self.health.set_producer_connected(False)
        self.health.set_consumer_joined(False)
        self._pauses.clear()
        if consumer is not None:
            close_quietly(consumer.close)
        if producer is not None:
            close_quietly(lambda: producer.close(1.0))
        self._connect()

    def _flush(self, timeout_s: float) -> bool:
        assert self._sender.producer is not None
        with self.health.waiting_on_broker():
            return self._sender.producer.flush(timeout_s)

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
            if self._consumer is not None and self._sender.producer is not None:
                self.settle(deadline)
                self._commit(deadline)
        finally:
            self.health.set_consumer_joined(False)
            self.health.set_producer_connected(False)
            consumer, producer = self._consumer, self._sender.producer
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
                # int8 weights are what sets the speed and the accuracy, not the fp32 around them
                "precision": "int8" if runtime.quantize == "int8" else str(runtime.precision),
            }
        )
        abstain_label = self._settings.decision.abstain_label
        self.metrics.preset_model(runtime.version, runtime.labels, abstain_label=abstain_label)
        self._publisher.check_labels(runtime.labels, runtime.version)
        self.health.set_model_loaded(True)
