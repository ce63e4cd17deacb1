"""Model updates: announcing a new current version, and following announcements to hot-swap.

The manifest of the model store is the source of truth; the compacted updates topic only
says "look again". An announcement is a small JSON value
``{"version": V, "path": "versions/V", "store": ROOT, "announced_at": T}`` under the fixed
key ``current`` (so compaction keeps just the latest). A follower re-reads the manifest on
every announcement and every ``retrain.manifest_poll_s``; whatever the manifest names is
what it serves, so a missed or reordered announcement costs at most one poll interval.

:class:`ModelSwapper` invariant: the new runtime is loaded and warmed completely before
the service is handed it; the service applies it between batches. Swaps are serialised
and a swap to the version already served is a no-op.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_classifier.config import Settings
from stream_classifier.errors import ConfigError, StreamClassifierError
from stream_classifier.learn.store import ModelStore, VersionEntry
from stream_classifier.model.cascade import CascadeRuntime
from stream_classifier.model.format import METADATA_FILE, ModelMetadata, load_model
from stream_classifier.model.runtime import ModelRuntime, on_a_passing_thread
from stream_classifier.model.student import Student
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.backoff import Backoff
from stream_classifier.stream.classifier import Classifier
from stream_classifier.transport import Producer, TopicReader, make_reader

logger = logging.getLogger(__name__)

ANNOUNCEMENT_KEY = b"current"
_ANNOUNCE_TIMEOUT_S = 10.0
_REOPEN_MIN_S = 1.0  # the updates reader is opened again after this, doubling on each failure
_REOPEN_MAX_S = 60.0


def encode_announcement(store: ModelStore, entry: VersionEntry) -> bytes:
    payload = {
        "version": entry.version,
        "path": entry.path,
        "store": str(store.root),
        "announced_at": time.time(),
    }
    return json.dumps(payload).encode("utf-8")


def announce(producer: Producer, topic: str, store: ModelStore, entry: VersionEntry) -> None:
    """Publish ``entry`` as the current version and wait for the broker's acknowledgement."""
    failures: list[BaseException] = []

    def delivered(error: BaseException | None) -> None:
        if error is not None:
            failures.append(error)

    producer.send(
        topic, encode_announcement(store, entry), key=ANNOUNCEMENT_KEY, headers=(), on_delivery=delivered
    )
    if not producer.flush(_ANNOUNCE_TIMEOUT_S) or failures:
        reason = failures[0] if failures else "timed out"
        # Replicas still converge through their manifest poll; say so rather than fail the promotion.
        log_event(logger, "model_announce_failed", logging.WARNING, version=entry.version, error=str(reason))
        return
    log_event(logger, "model_announced", version=entry.version, topic=topic)


def model_version_of(model_dir: Path) -> str:
    """The version a model directory says it is (loads the model only for bare setfit dirs)."""
    metadata = model_dir / METADATA_FILE
    if metadata.is_file():
        return ModelMetadata.model_validate_json(metadata.read_text(encoding="utf-8")).version
    return load_model(model_dir).version


def resolve_serving_model(settings: Settings) -> Path:
    """The model directory to serve at start.

    Without a model store: ``model.path``. With one: the manifest's current version, after
    seeding the store from ``model.path`` if it has no manifest yet.
    """
    root = settings.retrain.model_store
    if root is None:
        if settings.model.path is None:
            raise ConfigError(
                "setting 'model.path' (env STREAM_CLASSIFIER_MODEL__PATH) is required: the model "
                "directory to serve (or set retrain.model_store to serve the store's current version)"
            )
        return Path(settings.model.path)
    store = ModelStore(root, settings.retrain.keep_versions, int8=settings.model.quantize == "int8")
    if not store.exists():
        if settings.model.path is None:
            raise ConfigError(
                f"the model store {root} is empty: set STREAM_CLASSIFIER_MODEL__PATH once to seed it"
            )
        seed = Path(settings.model.path)
        if store.seed(seed, model_version_of(seed)):
            log_event(logger, "model_store_seeded", store=str(root), source=str(seed))
    return store.current()[1]


def runtime_options(settings: Settings) -> dict[str, Any]:
    """:class:`ModelRuntime`'s keyword arguments from the serving settings (trust aside)."""
    return {
        "device": settings.model.device,
        "precision": settings.model.precision,
        "token_budget": settings.batching.token_budget,
        "max_seq_length": settings.model.max_seq_length,
        "quantize": settings.model.quantize,
    }


def load_runtime(settings: Settings, path: Path) -> ModelRuntime:
    """A runtime for ``path`` with the serving settings, warmed up on a passing thread (so
    that the serving thread's CPU pool stays the process's only one: see
    :func:`~stream_classifier.model.runtime.on_a_passing_thread`)."""

    def load() -> ModelRuntime:
        runtime = ModelRuntime.load(path, trusted=settings.model.trusted, **runtime_options(settings))
        runtime.warmup()
        return runtime

    return on_a_passing_thread(load)


def load_serving_runtime(settings: Settings, path: Path) -> ModelRuntime | CascadeRuntime:
    """What serving runs for ``path``: with ``model.cascade`` on and a student built for this
    version under ``path/student``, the :class:`~stream_classifier.model.cascade.CascadeRuntime`;
    else the plain runtime of :func:`load_runtime` (with the cascade on, after one
    ``cascade_unavailable`` warning saying why). The student is only ever loaded here, never
    built (that takes minutes: promotions build it, :mod:`.promoted_student`)."""
    runtime = load_runtime(settings, path)
    if not settings.model.cascade:
        return runtime
    try:
        student = Student.load(path, model_version=runtime.version)
        cascade = CascadeRuntime(runtime, student)
    except StreamClassifierError as exc:  # no student, one of another version, or model2vec missing
        log_event(
            logger,
            "cascade_unavailable",
            logging.WARNING,
            path=str(path),
            version=runtime.version,
            reason=str(exc),
        )
        return runtime
    on_a_passing_thread(lambda: student.predict_proba(["warm up"]))  # the transformer is warm already
    log_event(logger, "cascade_loaded", path=str(path), version=cascade.version, bound=cascade.bound)
    return cascade


class ModelSwapper:
    """Loads store versions and hands them to the service (``swap``); see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        swap: Callable[[Classifier], None],
        metrics: Metrics,
        *,
        serving_version: str,
    ) -> None:
        self._settings = settings
        self._store = store
        self._swap = swap
        self.metrics = metrics
        self._lock = threading.Lock()
        self.serving_version = serving_version

    def swap_to(self, version: str) -> bool:
        """Serve ``version`` (loaded from the store); False when it is already served."""
        with self._lock:
            if version == self.serving_version:
                return False
            started = time.perf_counter()
            runtime = load_serving_runtime(self._settings, self._store.path_of(version))
            loaded = time.perf_counter() - started
            self._swap(runtime)
            self.metrics.model_load_seconds.set(loaded)
            log_event(
                logger,
                "model_swap_requested",
                version=version,
                previous=self.serving_version,
                load_seconds=round(loaded, 3),
            )
            self.serving_version = version
            return True


class UpdatesFollower:
    """A serving replica's loop: follow the updates topic and the manifest, swap on change."""

    def __init__(self, settings: Settings, store: ModelStore, swapper: ModelSwapper) -> None:
        self._settings = settings
        self._store = store
        self._swapper = swapper
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> None:
        """Swap to the manifest's current version if it is not the one served.

        Never raises (bar ``BaseException``s such as ``KeyboardInterrupt``): whatever reading
        the manifest, loading or swapping fails with is one ``model_update_failed`` line and one
        ``model_update_failures`` count; the replica keeps serving the model it has, and the
        next announcement or poll tries again, so a transient failure passes and a broken
        version is skipped as soon as the manifest names another.
        """
        version: str | None = None
        try:
            version = self._store.read().current
            if self._swapper.swap_to(version):
                log_event(logger, "model_update_applied", version=version)
        except Exception as exc:
            self._swapper.metrics.model_update_failures.inc()
            log_event(
                logger,
                "model_update_failed",
                logging.ERROR,
                version=version,
                error_type=type(exc).__name__,
                error=str(exc),
                exc_info=None if isinstance(exc, StreamClassifierError) else exc,
            )

    def run(self) -> None:
        """Follow until stopped. The manifest is read every ``retrain.manifest_poll_s`` whatever
        the updates topic does; a reader that fails (broker down, topic denied) is given up and
        opened again after a backoff that doubles from 1 s to 60 s, logged once per change of
        state (``model_updates_unavailable``, ``model_updates_available``)."""
        retrain = self._settings.retrain
        backoff = Backoff("model_updates", min_s=_REOPEN_MIN_S, max_s=_REOPEN_MAX_S)
        reader: TopicReader | None = None
        next_check = reopen_at = 0.0
        try:
            while not self._stop.is_set():
                if reader is None and time.monotonic() >= reopen_at:
                    reader = self._open_reader(backoff)
                    if reader is None:
                        reopen_at = time.monotonic() + backoff.delay_s
                announced = False
                if reader is not None:
                    try:
                        announced = bool(reader.poll(0.5))
                        backoff.ok()
                    except StreamClassifierError as exc:
                        # Broker gone, or refused for good (ACLs, credentials): reopen later;
                        # the manifest poll goes on meanwhile.
                        reader.close()
                        reader = None
                        reopen_at = time.monotonic() + backoff.failed(exc)
                else:
                    wake = min(reopen_at, next_check, time.monotonic() + 1.0)
                    self._stop.wait(max(0.05, wake - time.monotonic()))
                if announced or time.monotonic() >= next_check:
                    self.check()
                    next_check = time.monotonic() + retrain.manifest_poll_s
        finally:
            if reader is not None:
                reader.close()

    def _open_reader(self, backoff: Backoff) -> TopicReader | None:
        try:
            # From the end: what is current now comes from the manifest, not from history.
            return make_reader(
                self._settings.kafka,
                [self._settings.retrain.updates_topic],
                start="end",
                wait_for_topics_s=5.0,
            )
        except StreamClassifierError as exc:
            backoff.failed(exc)
            log_event(
                logger,
                "model_updates_reader_retry",
                logging.DEBUG,
                error=str(exc),
                retry_in_s=backoff.delay_s,
            )
            return None
