"""What the serving loop reports about itself, read by ``/healthz`` and ``/readyz``.

The service owns one :class:`HealthState` and calls its setters; the ops HTTP server only
reads it. Every method is thread-safe (one lock, no I/O under it).

Invariants:
- **live** (``/healthz``) means the main loop has started and ticked within
  ``liveness_timeout_s``, or is inside :meth:`HealthState.waiting_on_broker` (a broker
  call bounded by the client's own timeouts). A broker outage therefore never fails
  liveness, so Kubernetes does not restart pods in a loop while the broker is away.
  Before the first tick the process is not live: the startupProbe waits for it, which
  covers a slow model load.
- **ready** (``/readyz``) means model loaded, consumer joined, producer connected; the
  ``stream_classifier_ready`` gauge mirrors it on every change.
- **producer connected** is the latest evidence about the producer, not a socket state:
  true once the clients are created (``set_producer_connected(True)``) and after each
  acknowledged delivery (:meth:`HealthState.producer_acknowledged`); false from a delivery
  that failed for a reason the brokers may recover from (``set_producer_connected(False)``)
  until the next acknowledgement, and while the clients are closed. A broker that goes away
  is therefore seen at the first failed delivery: within the producer's delivery timeout
  when records are in flight, and not while nothing is produced. ``seconds_since_delivery``
  says how old the last acknowledgement is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Gauge


@dataclass(frozen=True)
class HealthSnapshot:
    """One consistent reading of the health state."""

    model_loaded: bool
    consumer_joined: bool
    producer_connected: bool
    seconds_since_delivery: float | None
    loop_started: bool
    waiting_on_broker: bool
    seconds_since_tick: float | None
    liveness_timeout_s: float

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.consumer_joined and self.producer_connected

    @property
    def live(self) -> bool:
        if self.waiting_on_broker:
            return True
        return self.seconds_since_tick is not None and self.seconds_since_tick <= self.liveness_timeout_s

    def as_dict(self) -> dict[str, object]:
        return {
            "live": self.live,
            "ready": self.ready,
            "model_loaded": self.model_loaded,
            "consumer_joined": self.consumer_joined,
            "producer_connected": self.producer_connected,
            "seconds_since_delivery": _rounded(self.seconds_since_delivery),
            "loop_started": self.loop_started,
            "waiting_on_broker": self.waiting_on_broker,
            "seconds_since_tick": _rounded(self.seconds_since_tick),
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


class HealthState:
    """Thread-safe health facts; ``ready_gauge`` (``Metrics.ready``) follows readiness."""

    def __init__(
        self,
        liveness_timeout_s: float,
        *,
        ready_gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._timeout = liveness_timeout_s
        self._gauge = ready_gauge
        self._model_loaded = False
        self._consumer_joined = False
        self._producer_connected = False
        self._last_delivery: float | None = None
        self._last_tick: float | None = None
        self._broker_waits = 0
        with self._lock:
            self._publish_ready()

    # ----------------------------------------------------------------- setters (service)

    def set_model_loaded(self, value: bool) -> None:
        with self._lock:
            self._model_loaded = value
            self._publish_ready()

    def set_consumer_joined(self, value: bool) -> None:
        with self._lock:
            self._consumer_joined = value
            self._publish_ready()

    def set_producer_connected(self, value: bool) -> None:
        """True once the clients are created; False when they are closed (shutdown,
        reconnect) and when a delivery failed for a reason the brokers may recover from."""
        with self._lock:
            self._producer_connected = value
            self._publish_ready()

    def producer_acknowledged(self) -> None:
        """Acknowledgements arrived: the producer reaches the brokers. Call once per drain
        of delivery reports that acknowledged at least one record, not once per record."""
        now = self._clock()
        with self._lock:
            self._producer_connected = True
            self._last_delivery = now
            self._publish_ready()

    def tick(self) -> None:
        """Call once per main-loop iteration (poll returns even when nothing arrived)."""
        now = self._clock()
        with self._lock:
            self._last_tick = now

    @contextmanager
    def waiting_on_broker(self) -> Iterator[None]:
        """Wrap a blocking broker call (flush, commit, reconnect): the loop counts as live."""
        with self._lock:
            self._broker_waits += 1
        try:
            yield
        finally:
            now = self._clock()
            with self._lock:
                self._broker_waits -= 1
                self._last_tick = now

    # ----------------------------------------------------------------- readers (ops server)

    def snapshot(self) -> HealthSnapshot:
        now = self._clock()
        with self._lock:
            return HealthSnapshot(
                model_loaded=self._model_loaded,
                consumer_joined=self._consumer_joined,
                producer_connected=self._producer_connected,
                seconds_since_delivery=None if self._last_delivery is None else now - self._last_delivery,
                loop_started=self._last_tick is not None,
                waiting_on_broker=self._broker_waits > 0,
                seconds_since_tick=None if self._last_tick is None else now - self._last_tick,
                liveness_timeout_s=self._timeout,
            )

    def _publish_ready(self) -> None:
        """Mirror readiness on the gauge; called with the lock held so updates never reorder."""
        if self._gauge is not None:
            ready = self._model_loaded and self._consumer_joined and self._producer_connected
            self._gauge.set(1 if ready else 0)
