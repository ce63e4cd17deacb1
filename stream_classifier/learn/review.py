"""Active learning: copy the predictions the model is unsure of to a review topic.

A prediction is copied when it abstained (its top label missed its threshold, with
``decision.abstain_label`` set: reason ``abstained``), when its top probability is below
``active_learning.threshold`` (``low_confidence``), or when the gap between its two highest
probabilities is below ``active_learning.margin`` (``low_margin``). Each copy is
rate-capped by a token bucket (``max_per_second``, burst of one second's worth), as JSON::

    {"text": ..., "probabilities": {label: p}, "label": decided label, "model_version": ...,
     "source": {"topic", "partition", "offset"}, "reason": ...}

plus ``"top_label"`` for an abstention. With threshold and margin both 0 (their defaults)
and no abstain label nothing can ever be copied: the router warns at start
(``review_never_fires``).

Labellers answer by writing ``{"text", "label"}`` (optionally with an ``id``) to a
feedback topic, which closes the loop. The router is the service's publish hook: the
service produces the copies and commits a message only once its copy is acknowledged too.
Copies over the cap are counted and dropped (they are copies; the prediction itself is
always published).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from stream_classifier.config import ActiveLearningSettings
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.codec import MODEL_VERSION_HEADER, OutgoingRecord
from stream_classifier.stream.service import PublishedBatch, PublishHook

logger = logging.getLogger(__name__)


class TokenBucket:
    """At most ``rate`` takes per second on average, bursts up to ``capacity``."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


def _published(row: np.ndarray) -> list[float]:
    """The probabilities exactly as the prediction output carries them (float64, renormalised)."""
    values = row.astype(np.float64)
    values /= values.sum()
    result: list[float] = values.tolist()
    return result


def uncertainty(row: np.ndarray, threshold: float, margin: float) -> str | None:
    """Why ``row`` (probabilities of at least two classes) is uncertain, or None when it is not."""
    top2 = np.sort(row)[-2:]
    if top2[1] < threshold:
        return "low_confidence"
    if top2[1] - top2[0] < margin:
        return "low_margin"
    return None


class ReviewRouter:
    """The service's publish hook for active learning; see the module docstring."""

    def __init__(
        self,
        settings: ActiveLearningSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        abstain_label: str | None = None,
    ) -> None:
        if settings.topic is None:
            raise ValueError("ReviewRouter needs active_learning.topic")
        if settings.threshold == 0 and settings.margin == 0 and abstain_label is None:
            log_event(
                logger,
                "review_never_fires",
                logging.WARNING,
                topic=settings.topic,
                hint="set active_learning.threshold or active_learning.margin above 0, or "
                "decision.abstain_label with decision.thresholds, for anything to be copied",
            )
        self._topic = settings.topic
        self._threshold = settings.threshold
        self._margin = settings.margin
        self._bucket = TokenBucket(settings.max_per_second, max(1.0, settings.max_per_second), clock)
        self._metrics = metrics

    def __call__(self, batch: PublishedBatch) -> Iterator[tuple[int, OutgoingRecord]]:
        classes = list(batch.classes)
        for index, row in enumerate(batch.probabilities):
            abstained = bool(batch.abstained) and batch.abstained[index]
            reason = "abstained" if abstained else uncertainty(row, self._threshold, self._margin)
            if reason is None:
                continue
            if not self._bucket.take():
                self._metrics.review_rate_limited.inc()
                continue
            record = batch.records[index]
            payload = {
                "text": batch.texts[index],
                "probabilities": dict(zip(classes, _published(row), strict=True)),
                "label": batch.labels[index],
                "model_version": batch.model_version,
                "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
                "reason": reason,
            }
            if abstained:
                payload["top_label"] = classes[int(np.argmax(row))]
            value = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            headers = ((MODEL_VERSION_HEADER, batch.model_version.encode("utf-8")),)
            self._metrics.review_routed.inc()
            yield index, OutgoingRecord(self._topic, value, record.key, headers)


def review_hook(
    settings: ActiveLearningSettings, metrics: Metrics, *, abstain_label: str | None = None
) -> PublishHook | None:
    """The service's publish hook: a :class:`ReviewRouter` when a review topic is set, else None."""
    return ReviewRouter(settings, metrics, abstain_label=abstain_label) if settings.topic else None
