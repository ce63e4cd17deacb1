"""Every Prometheus metric of stream-classifier, defined in this one place.

Invariants:
- every name starts with ``stream_classifier_``, uses base units (seconds, bytes) and
  ``_total`` on counters;
- every metric exists from process start: labelled series are pre-set for every label
  value known then (dead-letter reasons, retrain outcomes, score kinds), and the rest
  (topics, labels, partitions) as soon as they are known, so dashboards and alerts can be
  checked against any instance, CPU or GPU, serving-only or trainer;
- label cardinality is bounded: topics and partitions by the deployment (output topics:
  ``kafka.output_topic`` and the ``output.routes`` targets), prediction and feedback labels
  by ``feedback.max_labels``, reasons and outcomes by the enums below, and ``model_version``
  (predictions and confidence) to the served version and the one before it:
  :meth:`Metrics.preset_model` removes the series of older versions at each swap, so that
  champion and challenger can be compared after a swap and a long-lived process keeps two
  versions' series at most (a batch of an older version still being published at the swap
  may add its series back until the next swap).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal, get_args

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

PREFIX = "stream_classifier"

# Every reason a message can become a dead letter (codec reasons + processing reasons).
DeadLetterReason = Literal[
    "null_value",
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_text",
    "text_not_string",
    "empty_text",
    "invalid_label",
    "missing_label",
    "invalid_id",
    "inference_failed",
    "invalid_text",
    "output_too_large",
    "output_rejected",
    "unreadable_record",
    "label_too_long",
    "processing_failed",
]
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)
# Why the bounded feedback set let a held (or arriving) example go; see learn.feedback.
FeedbackDropReason = Literal["label_cap", "byte_budget", "label_evicted", "candidate_evicted"]
FEEDBACK_DROP_REASONS: tuple[FeedbackDropReason, ...] = get_args(FeedbackDropReason)
FEEDBACK_READER_STAGES = ("read", "record")
# Why an output went out plain instead of enriched (output.include_input / output.headers).
OutputReducedReason = Literal["too_large", "unencodable"]
OUTPUT_REDUCED_REASONS: tuple[OutputReducedReason, ...] = get_args(OutputReducedReason)
_KEPT_VERSIONS = 2  # model versions whose series are kept: the served one and the one before
RETRAIN_OUTCOMES = ("promoted", "rejected", "skipped", "failed")
RETRAIN_PHASES = ("load", "train", "evaluate", "swap")
SCORE_SPLITS = ("holdout", "trusted")
SCORE_METRICS = ("macro_f1", "accuracy", "ece", "log_loss")
SCORE_ROLES = ("champion", "challenger")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_INFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_RETRAIN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The process's metrics, registered on ``registry`` (the default one in production).

    Tests pass a fresh :class:`CollectorRegistry` so that several services can live in one
    process; it gets its own process collector, so that every registry exposes the same
    ``process_*`` series as the default one.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        r = registry
        if registry is not REGISTRY:
            ProcessCollector(registry=r)

        # Traffic
        self.messages_consumed = Counter(
            f"{PREFIX}_messages_consumed", "Input messages consumed.", ["topic"], registry=r
        )
        self.predictions = Counter(
            f"{PREFIX}_predictions",
            "Predictions published, by decided label (the abstain label included) and model version.",
            ["label", "model_version"],
            registry=r,
        )
        self.outputs = Counter(
            f"{PREFIX}_outputs", "Prediction outputs produced, per output topic.", ["topic"], registry=r
        )
        self.outputs_reduced = Counter(
            f"{PREFIX}_outputs_reduced",
            "Outputs sent plain instead of enriched: too large for kafka.max_request_size, or an input "
            "that is not strict JSON (NaN).",
            ["reason"],
            registry=r,
        )
        self.abstentions = Counter(
            f"{PREFIX}_abstentions",
            "Messages published under the abstain label, by their top label.",
            ["label"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Messages sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.produce_errors = Counter(
            f"{PREFIX}_produce_errors", "Failed produce attempts (outputs and dead letters).", registry=r
        )
        self.commit_errors = Counter(f"{PREFIX}_commit_errors", "Failed offset commits.", registry=r)
        self.runtime_failures = Counter(
            f"{PREFIX}_runtime_failures",
            "Batches the model runtime failed (out of memory, a broken model); retried, not dead-lettered.",
            registry=r,
        )
        self.rebalances = Counter(
            f"{PREFIX}_rebalances", "Consumer-group partition assignments and revocations.", registry=r
        )

        # Timing
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size_messages",
            "Messages per inference batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_seconds", "Model time per batch.", buckets=_INFER_BUCKETS, registry=r
        )
        self.end_to_end_latency = Histogram(
            f"{PREFIX}_end_to_end_latency_seconds",
            "From the input record's timestamp to its output being acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_messages", "Messages consumed but not yet committed.", registry=r
        )

        # Lag
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag_messages",
            "End offset minus position, per assigned input partition.",
            ["topic", "partition"],
            registry=r,
        )

        # The model
        self.model_info = Info(f"{PREFIX}_model", "The model being served.", registry=r)
        self.model_load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds", "Duration of the last model load and warm-up.", registry=r
        )
        self.model_swaps = Counter(f"{PREFIX}_model_swaps", "Hot swaps of the served model.", registry=r)
        self.model_update_failures = Counter(
            f"{PREFIX}_model_update_failures",
            "Model updates the follower could not apply (manifest read, load or swap); it serves on.",
            registry=r,
        )
        self.confidence = Histogram(
            f"{PREFIX}_prediction_confidence",
            "Top class probability of each prediction, per model version.",
            ["model_version"],
            buckets=_CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz would answer 200.", registry=r)

        # Retraining
        self.retrain_runs = Counter(
            f"{PREFIX}_retrain_runs", "Retraining runs by outcome.", ["outcome"], registry=r
        )
        self.retrain_duration = Histogram(
            f"{PREFIX}_retrain_duration_seconds",
            "Duration of each retraining phase.",
            ["phase"],
            buckets=_RETRAIN_BUCKETS,
            registry=r,
        )
        self.retrain_examples = Gauge(
            f"{PREFIX}_retrain_examples", "Examples used by the last retraining run.", ["split"], registry=r
        )
        self.retrain_score = Gauge(
            f"{PREFIX}_retrain_score",
            "Last evaluation scores of champion and challenger.",
            ["role", "split", "metric"],
            registry=r,
        )
        self.promotions = Counter(f"{PREFIX}_model_promotions", "Challengers promoted.", registry=r)
        self.feedback_examples = Gauge(
            f"{PREFIX}_feedback_examples", "Feedback examples held, per label.", ["label"], registry=r
        )
        self.feedback_received = Counter(
            f"{PREFIX}_feedback_received", "Valid feedback messages read.", registry=r
        )
        self.feedback_held_bytes = Gauge(
            f"{PREFIX}_feedback_held_bytes",
            "Memory of the held feedback examples, pending labels included (feedback.max_held_bytes).",
            registry=r,
        )
        self.feedback_dropped = Counter(
            f"{PREFIX}_feedback_dropped",
            "Feedback examples the bounded set let go, by reason.",
            ["reason"],
            registry=r,
        )
        self.feedback_reader_errors = Counter(
            f"{PREFIX}_feedback_reader_errors",
            "Unexpected feedback reader failures: one record's (dead-lettered) or the read loop's (retried).",
            ["stage"],
            registry=r,
        )
        self.review_routed = Counter(
            f"{PREFIX}_review_routed", "Uncertain predictions copied to the review topic.", registry=r
        )
        self.review_rate_limited = Counter(
            f"{PREFIX}_review_rate_limited",
            "Uncertain predictions not copied because of the review rate cap.",
            registry=r,
        )

        # Runtime
        self.gpu_memory_allocated = Gauge(
            f"{PREFIX}_gpu_memory_allocated_bytes", "CUDA memory allocated by torch (0 on CPU).", registry=r
        )

        self._versions: OrderedDict[str, list[str]] = OrderedDict()  # version -> its predictions' labels
        self._versions_lock = threading.Lock()
        self._preset()

    def _preset(self) -> None:
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        for outcome in RETRAIN_OUTCOMES:
            self.retrain_runs.labels(outcome=outcome)
        for phase in RETRAIN_PHASES:
            self.retrain_duration.labels(phase=phase)
        for split in ("train", *SCORE_SPLITS):
            self.retrain_examples.labels(split=split)
        for role in SCORE_ROLES:
            for split in SCORE_SPLITS:
                for metric in SCORE_METRICS:
                    self.retrain_score.labels(role=role, split=split, metric=metric)
        for drop in FEEDBACK_DROP_REASONS:
            self.feedback_dropped.labels(reason=drop)
        for stage in FEEDBACK_READER_STAGES:
            self.feedback_reader_errors.labels(stage=stage)
        for reduced in OUTPUT_REDUCED_REASONS:
            self.outputs_reduced.labels(reason=reduced)
        self.model_info.info({"version": "", "base_model": "", "device": "", "precision": ""})
        self.ready.set(0)

    def preset_topics(self, topics: Iterable[str], outputs: Iterable[str] = ()) -> None:
        """Create the per-topic series (input and output topics) at start-up."""
        for topic in topics:
            self.messages_consumed.labels(topic=topic)
        for topic in outputs:
            self.outputs.labels(topic=topic)

    def preset_labels(self, labels: Iterable[str]) -> None:
        """Create the per-label series for a model's labels (at load and at every swap)."""
        for label in labels:
            self.feedback_examples.labels(label=label)
            self.abstentions.labels(label=label)

    def preset_model(self, version: str, labels: Iterable[str], *, abstain_label: str | None = None) -> None:
        """Create the series of the model now served, and remove those of versions before the
        previous one (at load and at every swap; thread-safe)."""
        labels = list(labels)
        self.preset_labels(labels)
        published = [*labels, abstain_label] if abstain_label is not None else labels
        with self._versions_lock:
            self._versions.pop(version, None)
            self._versions[version] = published
            while len(self._versions) > _KEPT_VERSIONS:
                old, old_labels = self._versions.popitem(last=False)
                for label in old_labels:
                    with contextlib.suppress(KeyError):
                        self.predictions.remove(label, old)
                with contextlib.suppress(KeyError):
                    self.confidence.remove(old)
        for label in published:
            self.predictions.labels(label=label, model_version=version)
        self.confidence.labels(model_version=version)
