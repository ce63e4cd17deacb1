"""The learning side of one process, assembled: the updates follower everywhere a model store
is configured, and in the trainer role the feedback reader and the :class:`Retrainer`.

Invariant: only the trainer (``retrain.enabled``) reads feedback and trains, holding the
store's trainer lock for its lifetime; every replica follows the updates topic.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from stream_classifier.config import Settings
from stream_classifier.errors import ConfigError, TransportError
from stream_classifier.learn.feedback import FeedbackReader
from stream_classifier.learn.retrainer import Retrainer, RunRecord, TrainerLock, champion_labels
from stream_classifier.learn.store import ModelStore
from stream_classifier.learn.updates import ModelSwapper, UpdatesFollower, resolve_serving_model
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.classifier import Classifier
from stream_classifier.transport import Producer, Transport

logger = logging.getLogger(__name__)


def require_store(settings: Settings) -> ModelStore:
    """The configured model store, or a :class:`ConfigError` saying how to configure one."""
    if settings.retrain.model_store is None:
        raise ConfigError(
            "setting 'retrain.model_store' (env STREAM_CLASSIFIER_RETRAIN__MODEL_STORE) is required for "
            "retraining and model updates: a directory (or shared volume) for the model versions"
        )
    return ModelStore(
        settings.retrain.model_store, settings.retrain.keep_versions, int8=settings.model.quantize == "int8"
    )


class Learning:
    """The learning side of one ``serve`` process: its threads and how to stop them.

    Every process with a model store follows the updates topic and the manifest (so a
    rollback reaches the trainer too); the trainer (``retrain.enabled``) also reads the
    feedback topics and runs the :class:`Retrainer`.
    """

    def __init__(
        self,
        follower: UpdatesFollower,
        retrainer: Retrainer | None = None,
        feedback: FeedbackReader | None = None,
        lock: TrainerLock | None = None,
        producer: Producer | None = None,
    ) -> None:
        self.follower = follower
        self.retrainer = retrainer
        self.feedback = feedback
        self._lock = lock
        self._producer = producer
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        loops = [("model-updates", self.follower.run)]
        if self.feedback is not None and self.retrainer is not None:
            loops += [("feedback-reader", self.feedback.run), ("retrainer", self.retrainer.run)]
        for name, target in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def trigger(self) -> bool:
        """The POST /retrain callback: schedule a run; False if one is pending or running."""
        return self.retrainer.request() if self.retrainer is not None else False

    def stop(self, timeout_s: float = 30.0) -> None:
        self.follower.stop()
        for part in (self.feedback, self.retrainer):
            if part is not None:
                part.stop()
        for thread in self._threads:
            thread.join(timeout_s)
        if self._producer is not None:
            self._producer.close(10.0)
        if self._lock is not None:
            self._lock.release()


class SwapTarget(Protocol):
    """What the learning side needs of the serving loop (``StreamService`` fits)."""

    def swap_model(self, runtime: Classifier) -> None: ...

    @property
    def model_version(self) -> str: ...


def start_learning(
    settings: Settings, service: SwapTarget, metrics: Metrics, transport: Transport
) -> Learning | None:
    """Start following model updates and, in the trainer role, retraining. None without a store."""
    retrain = settings.retrain
    if retrain.model_store is None:
        if retrain.enabled:
            require_store(settings)
        return None
    store = require_store(settings)
    swapper = ModelSwapper(
        settings, store, service.swap_model, metrics, serving_version=service.model_version
    )
    follower = UpdatesFollower(settings, store, swapper)
    if not retrain.enabled:
        learning = Learning(follower)
    else:
        if not settings.feedback.topics:
            raise ConfigError(
                "setting 'feedback.topics' (env STREAM_CLASSIFIER_FEEDBACK__TOPICS) is empty: "
                "retraining needs at least one labelled feedback topic"
            )
        model_labels = champion_labels(store)
        lock = TrainerLock(store)
        store.clear_staging()
        producer = transport.producer()
        feedback = FeedbackReader(
            settings, producer, metrics, baseline=store.read().feedback_offsets, model_labels=model_labels
        )
        retrainer = Retrainer(settings, store, feedback, metrics, producer, swapper=swapper)
        learning = Learning(follower, retrainer, feedback, lock, producer)
    learning.start()
    log_event(logger, "learning_started", trainer=retrain.enabled, store=str(store.root), mode=retrain.mode)
    return learning


def retrain_once(settings: Settings, metrics: Metrics, transport: Transport, *, force: bool) -> RunRecord:
    """One run as its own process (``stream-classifier retrain``): rebuild, train, gate, announce.

    Refused (:class:`ModelStoreError`) while another trainer holds the store.
    """
    store = require_store(settings)
    resolve_serving_model(settings)  # seeds the store on first use
    model_labels = champion_labels(store)
    lock = TrainerLock(store)
    producer = transport.producer()
    feedback = FeedbackReader(
        settings, producer, metrics, baseline=store.read().feedback_offsets, model_labels=model_labels
    )
    reader = threading.Thread(target=feedback.run, name="feedback-reader", daemon=True)
    try:
        store.clear_staging()
        reader.start()
        while not feedback.caught_up.wait(0.5):
            if feedback.error is not None or not reader.is_alive():
                raise TransportError(f"cannot read the feedback topics: {feedback.error}")
        retrainer = Retrainer(settings, store, feedback, metrics, producer)
        return retrainer.run_once(trigger="cli", force=force)
    finally:
        feedback.stop()
        reader.join(10)
        producer.close(10.0)
        lock.release()
