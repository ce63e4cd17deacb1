"""Which input partitions the consumer pauses, and why.

Invariant: after :meth:`Pauses.apply`, the consumer's paused set is exactly what the three
reasons ask for: backpressure (every assigned partition, from ``limit`` messages in flight
until half of them are committed), a broken runtime (every assigned partition until a
deadline) and a failed delivery (that partition until its deadline). A reason for a
partition no longer assigned is dropped.
"""

from __future__ import annotations

import logging

from stream_classifier.ops.logs import log_event
from stream_classifier.transport.base import Consumer, Partition

logger = logging.getLogger(__name__)


class Pauses:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._backpressure = False
        self._held: dict[Partition, float] = {}  # partition -> when it may resume (a failed delivery)
        self._all_held_until = 0.0  # every partition (a broken runtime)
        self._paused: set[Partition] = set()

    def backpressure(self, in_flight: int) -> None:
        if not self._backpressure and in_flight >= self._limit:
            self._backpressure = True
            log_event(logger, "consumption_paused", in_flight=in_flight)
        elif self._backpressure and in_flight <= self._limit // 2:
            self._backpressure = False
            log_event(logger, "consumption_resumed", in_flight=in_flight)

    def hold(self, partition: Partition, until: float) -> None:
        self._held[partition] = until

    def hold_all(self, until: float) -> None:
        self._all_held_until = until

    def release(self, partition: Partition) -> None:
        self._held.pop(partition, None)

    def assigned(self, partitions: set[Partition]) -> None:
        """A newly assigned partition starts unpaused in the client."""
        self._paused -= partitions

    def clear(self) -> None:
        """The consumer was replaced: nothing is paused in the new one, and no delivery is held."""
        self._paused.clear()
        self._held.clear()

    def apply(self, consumer: Consumer, now: float) -> None:
        assigned = consumer.assignment()
        for tp, until in list(self._held.items()):
            if until <= now or tp not in assigned:
                del self._held[tp]
        wanted = assigned if self._backpressure or now < self._all_held_until else set(self._held)
        self._paused &= assigned
        if pause := wanted - self._paused:
            consumer.pause(pause)
        if resume := self._paused - wanted:
            consumer.resume(resume)
        self._paused = set(wanted)
