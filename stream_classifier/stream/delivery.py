"""The delivery guarantee: how consumed offsets are committed. One strategy per service,
picked once from ``processing.guarantee`` by :func:`make_delivery`.

- :class:`AtLeastOnce`: the acknowledged prefix of each partition
  (:meth:`OffsetTracker.to_commit`) is committed with :meth:`Consumer.commit`; a failed
  commit is retried on the next turn, logged once per change of state.
- :class:`ExactlyOnce`: outputs, dead letters and the consumed offsets go into one Kafka
  transaction, opened by the first send after a commit. A commit is a barrier: everything
  consumed so far is run, published and acknowledged (:meth:`Pipeline.settle`, by a deadline
  of at most ``_TRANSACTION_TIMEOUT_S``), then the offsets are added with the group's
  metadata (``send_offsets_to_transaction``, fenced by the group generation, KIP-447) and
  the transaction committed. A failed transaction is aborted and the clients reconnect;
  consumption resumes from the last committed transaction.

  On revoke, the revoked partitions' outputs are never committed without their offsets:
  if the consumer still holds every revoked partition (librdkafka calls ``on_revoke``
  before they go; kafka-python after, when only partitions given back to this member are
  held), the open transaction is committed with their offsets; otherwise (and always on
  loss) it is aborted and everything uncommitted is read again (:meth:`Pipeline.undo`).

  The transactional id is stable per instance (``processing.transactional_id``, by default
  ``<prefix>-<POD_NAME or host name>``): a restarted instance's ``init_transactions``
  fences its crashed predecessor's open transaction at once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Set
from typing import Protocol

from stream_classifier.config import ProcessingSettings
from stream_classifier.errors import BrokerUnavailableError, RecordRejectedError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.offsets import OffsetTracker
from stream_classifier.transport.base import Consumer, Partition, Producer, Transport

logger = logging.getLogger(__name__)

_MIN_TRANSACTION_INTERVAL_S = 0.1
_TRANSACTION_TIMEOUT_S = 30.0


class Pipeline(Protocol):
    """What a delivery strategy asks of the serving loop (its I/O thread)."""

    def settle(self, deadline: float) -> bool:
        """Run, publish and acknowledge everything consumed, by ``deadline`` (monotonic).

        True when nothing consumed is left unacknowledged.
        """

    def undo(self) -> None:
        """Drop every partition's uncommitted work and re-read it from its restart point."""


def close_quietly(close: Callable[[], object]) -> None:
    try:
        close()
    except Exception as exc:
        log_event(logger, "close_failed", logging.WARNING, error=repr(exc))


def transactional_id(processing: ProcessingSettings) -> str:
    """This instance's transactional id: the setting, else ``<prefix>-<POD_NAME or host name>``."""
    if processing.transactional_id:
        return processing.transactional_id
    instance = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{processing.transactional_id_prefix}-{instance}"


class AtLeastOnce:
    """Commits acknowledged offsets; see the module docstring."""

    read_committed = False

    def __init__(
        self, processing: ProcessingSettings, tracker: OffsetTracker, metrics: Metrics, health: HealthState
    ) -> None:
        self.interval_s = processing.commit_interval_ms / 1000
        self._tracker = tracker
        self._metrics = metrics
        self._health = health
        self._failing = False  # logs once per change of state, not once per retry
        self.needs_reconnect = False  # never set: a failed commit is retried on the next turn

    def producer(self, transport: Transport) -> Producer:
        return transport.producer()

    def sending(self, producer: Producer) -> None:
        """A record is about to be sent."""

    def commit(self, consumer: Consumer, producer: Producer, pipeline: Pipeline, deadline: float) -> None:
        offsets = self._tracker.to_commit()
        if not offsets:
            return
        try:
            with self._health.waiting_on_broker():
                consumer.commit(offsets)
        except BrokerUnavailableError as exc:
            # Retried on the next turn (the loop keeps polling, so rebalances are still seen).
            self._metrics.commit_errors.inc()
            if not self._failing:
                log_event(logger, "commit_failed", logging.WARNING, error=str(exc))
            self._failing = True
            return
        self._tracker.committed(offsets)
        if self._failing:
            log_event(logger, "commit_recovered")
        self._failing = False

    def releasing(
        self,
        partitions: Set[Partition],
        consumer: Consumer,
        producer: Producer,
        pipeline: Pipeline,
        *,
        lost: bool,
    ) -> bool:
        """Partitions are going; True when their work is committed and their state may simply go."""
        return False

    def reconnecting(self) -> None:
        """The clients are being replaced."""


class ExactlyOnce:
    """Commits outputs and offsets in one transaction; see the module docstring."""

    read_committed = True

    def __init__(
        self, processing: ProcessingSettings, tracker: OffsetTracker, metrics: Metrics, health: HealthState
    ) -> None:
        self.interval_s = max(processing.commit_interval_ms / 1000, _MIN_TRANSACTION_INTERVAL_S)
        self.transactional_id = transactional_id(processing)
        self._tracker = tracker
        self._metrics = metrics
        self._health = health
        self._in_transaction = False
        self.needs_reconnect = False  # an aborted transaction left the clients' state behind

    def producer(self, transport: Transport) -> Producer:
        producer = transport.producer(transactional_id=self.transactional_id)
        try:
            producer.init_transactions(_TRANSACTION_TIMEOUT_S)
        except BaseException:
            close_quietly(lambda: producer.close(1.0))
            raise
        log_event(logger, "transactions_initialised", transactional_id=self.transactional_id)
        return producer

    def sending(self, producer: Producer) -> None:
        if not self._in_transaction:
            producer.begin_transaction()
            self._in_transaction = True

    def commit(self, consumer: Consumer, producer: Producer, pipeline: Pipeline, deadline: float) -> None:
        """Barrier, then commit; ``deadline`` is capped at ``_TRANSACTION_TIMEOUT_S`` from now."""
        if not self._in_transaction:
            return
        deadline = min(deadline, time.monotonic() + _TRANSACTION_TIMEOUT_S)
        settled = pipeline.settle(deadline)
        offsets = self._tracker.to_commit()
        try:
            if not settled:
                raise BrokerUnavailableError("not every record of the transaction was acknowledged in time")
            timeout_s = max(0.1, deadline - time.monotonic())
            with self._health.waiting_on_broker():
                if offsets:
                    producer.send_offsets_to_transaction(offsets, consumer, timeout_s)
                producer.commit_transaction(max(0.1, deadline - time.monotonic()))
        except (BrokerUnavailableError, RecordRejectedError) as exc:
            self._abort(producer, exc, deadline)
            self.needs_reconnect = True
            return
        self._in_transaction = False
        self._tracker.committed(offsets)

    def releasing(
        self,
        partitions: Set[Partition],
        consumer: Consumer,
        producer: Producer,
        pipeline: Pipeline,
        *,
        lost: bool,
    ) -> bool:
        if not self._in_transaction or self.needs_reconnect:
            return False
        if not lost and partitions <= consumer.assignment():
            self.commit(consumer, producer, pipeline, time.monotonic() + _TRANSACTION_TIMEOUT_S)
            return not self.needs_reconnect
        why = "lost" if lost else "revoked after they went"
        if self._abort(
            producer, BrokerUnavailableError(f"partitions {why}: their offsets cannot commit"), None
        ):
            pipeline.undo()
        else:
            self.needs_reconnect = True
        return False

    def reconnecting(self) -> None:
        self.needs_reconnect = False
        self._in_transaction = False

    def _abort(self, producer: Producer, error: BaseException, deadline: float | None) -> bool:
        """Undo the open transaction; True when the producer may go on (the abort succeeded)."""
        self._metrics.commit_errors.inc()
        log_event(logger, "transaction_aborted", logging.WARNING, error=str(error))
        self._in_transaction = False
        timeout_s = _TRANSACTION_TIMEOUT_S if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            producer.abort_transaction(timeout_s)
        except Exception as exc:
            log_event(logger, "close_failed", logging.WARNING, error=repr(exc))
            return False
        return True


Delivery = AtLeastOnce | ExactlyOnce


def make_delivery(
    processing: ProcessingSettings, tracker: OffsetTracker, metrics: Metrics, health: HealthState
) -> Delivery:
    if processing.guarantee == "exactly_once":
        return ExactlyOnce(processing, tracker, metrics, health)
    return AtLeastOnce(processing, tracker, metrics, health)
