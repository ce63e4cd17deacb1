"""The composition root: settings -> transport, metrics, health, ops server, model, service, learning.

Every entry point builds its process here: ``serve`` (:meth:`App.run` on the main thread),
the demo, the bench and the tests (:meth:`App.running`, the app on a thread of its own).
What a caller may supply instead (an already loaded model, a private metrics registry, a
publish hook) is a constructor argument; everything else follows from the settings.

Invariants:

- The ops server, when on, answers from before the model load (probes see 503, not a
  refused connection) until after the service stopped.
- ``POST /retrain`` exists only in the trainer role (``retrain.enabled``); elsewhere it
  answers 404.
- :meth:`App.stop` is thread- and signal-safe and may come at any point, the model load
  included: it always ends in the service's graceful shutdown.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from stream_classifier.config import Settings
from stream_classifier.learn.learning import Learning, start_learning
from stream_classifier.learn.review import review_hook
from stream_classifier.learn.updates import load_serving_runtime, resolve_serving_model
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.http import OpsServer, start_ops_server
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.classifier import Classifier
from stream_classifier.stream.service import PublishHook, StreamService
from stream_classifier.transport import Transport, make_transport


class App:
    """One serving process; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        runtime: Classifier | None = None,
        metrics: Metrics | None = None,
        transport: Transport | None = None,
        publish_hook: PublishHook | None = None,
        ops: bool = True,
        learning: bool = True,
    ) -> None:
        self.settings = settings
        self.transport = transport or make_transport(settings.kafka)  # validates the client settings first
        self.metrics = metrics or Metrics()
        self.health = HealthState(settings.metrics.liveness_timeout_s, ready_gauge=self.metrics.ready)
        self._runtime = runtime
        # The active-learning review hook unless the caller brings its own.
        self._publish_hook = publish_hook or review_hook(
            settings.active_learning, self.metrics, abstain_label=settings.decision.abstain_label
        )
        self._with_ops = ops
        self._with_learning = learning
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.service: StreamService | None = None
        self.learning: Learning | None = None
        self.ops: OpsServer | None = None

    def run(self) -> None:
        """Serve until :meth:`stop`; returns after the graceful shutdown (raises what ended it)."""
        if self._with_ops:
            trigger = self._trigger if self.settings.retrain.enabled else None
            self.ops = start_ops_server(
                self.settings.metrics,
                self.metrics,
                self.health,
                trigger,
                retrain_token=self.settings.retrain.api_token,
            )
        try:
            runtime = self._runtime or self._load()
            service = StreamService(
                self.settings,
                runtime,
                metrics=self.metrics,
                transport=self.transport,
                publish_hook=self._publish_hook,
                health=self.health,
            )
            with self._lock:
                self.service = service
                if self._stopping.is_set():
                    service.stop()
            if self._with_learning:
                self.learning = start_learning(self.settings, service, self.metrics, self.transport)
            service.run()
        finally:
            if self.learning is not None:
                self.learning.stop()
            if self.ops is not None:
                self.ops.stop()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (thread- and signal-safe, at any point)."""
        self._stopping.set()
        service = self.service
        if service is not None:
            service.stop()

    @contextlib.contextmanager
    def running(self, join_timeout_s: float | None = None) -> Iterator[App]:
        """The app on a thread of its own, until the ``with`` block ends; then stopped and joined.

        Re-raises what ended the app early, and fails when it does not stop within
        ``join_timeout_s`` (default: ``processing.shutdown_timeout_s`` + 30 s).
        """
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="stream-classifier-app", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop()
            thread.join(join_timeout_s or self.settings.processing.shutdown_timeout_s + 30)
        if thread.is_alive():
            raise RuntimeError("the service did not stop within its shutdown timeout")
        if errors:
            raise errors[0]

    def wait_started(self, timeout_s: float) -> StreamService:
        """The service, once built (after the model load); raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while self.service is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service was not built within {timeout_s:.0f} s")
            self._stopping.wait(0.05)
        return self.service

    def _load(self) -> Classifier:
        started = time.perf_counter()
        runtime = load_serving_runtime(self.settings, resolve_serving_model(self.settings))
        self.metrics.model_load_seconds.set(time.perf_counter() - started)
        return runtime

    def _trigger(self) -> bool:
        learning = self.learning
        return learning is not None and learning.trigger()
