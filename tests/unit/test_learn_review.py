"""Active-learning routing: which predictions are uncertain, the copy's content, the rate cap."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.config import ActiveLearningSettings
from stream_classifier.learn.review import ReviewRouter, TokenBucket, uncertainty
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.service import PublishedBatch
from stream_classifier.transport import Record


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _batch(rows: list[list[float]]) -> PublishedBatch:
    classes = ["a", "b", "c"]
    probabilities = np.array(rows, dtype=np.float32)
    return PublishedBatch(
        records=[Record("in", 0, i, b"k%d" % i, b"{}", (), None) for i in range(len(rows))],
        texts=[f"text {i}" for i in range(len(rows))],
        probabilities=probabilities,
        classes=classes,
        labels=[classes[int(r.argmax())] for r in probabilities],
        model_version="v7",
    )


def test_uncertainty_by_threshold_and_margin() -> None:
    assert uncertainty(np.array([0.5, 0.3, 0.2]), threshold=0.6, margin=0.0) == "low_confidence"
    assert uncertainty(np.array([0.5, 0.45, 0.05]), threshold=0.4, margin=0.1) == "low_margin"
    assert uncertainty(np.array([0.9, 0.05, 0.05]), threshold=0.6, margin=0.1) is None


def test_router_copies_uncertain_predictions_with_text_probabilities_and_version() -> None:
    settings = ActiveLearningSettings(topic="review", threshold=0.6, margin=0.0, max_per_second=100)
    metrics = Metrics(CollectorRegistry())
    router = ReviewRouter(settings, metrics, clock=FakeClock())
    out = list(router(_batch([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])))
    assert [index for index, _ in out] == [1]
    record = out[0][1]
    assert record.topic == "review"
    assert record.key == b"k1"
    payload = json.loads(record.value or b"")
    assert payload["text"] == "text 1"
    assert payload["model_version"] == "v7"
    assert payload["reason"] == "low_confidence"
    assert payload["probabilities"] == {"a": 0.4000000059604645, "b": 0.3499999940395355, "c": 0.25}
    assert payload["source"] == {"topic": "in", "partition": 0, "offset": 1}
    assert metrics.registry.get_sample_value("stream_classifier_review_routed_total") == 1


def test_rate_cap_limits_copies_and_counts_the_rest() -> None:
    clock = FakeClock()
    settings = ActiveLearningSettings(topic="review", threshold=1.0, max_per_second=2)
    metrics = Metrics(CollectorRegistry())
    router = ReviewRouter(settings, metrics, clock=clock)
    uncertain = [[0.4, 0.3, 0.3]] * 10
    assert len(list(router(_batch(uncertain)))) == 2  # a burst of one second's worth
    clock.now += 1.0
    assert len(list(router(_batch(uncertain)))) == 2
    clock.now += 0.25
    assert len(list(router(_batch(uncertain)))) == 0
    assert metrics.registry.get_sample_value("stream_classifier_review_rate_limited_total") == 26


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4, capacity=4, clock=clock)
    assert sum(bucket.take() for _ in range(10)) == 4
    clock.now += 100
    assert sum(bucket.take() for _ in range(10)) == 4
    clock.now += 0.5
    assert sum(bucket.take() for _ in range(10)) == 2


def test_abstentions_are_copied_even_when_confident_with_their_top_label() -> None:
    settings = ActiveLearningSettings(topic="review", max_per_second=100)  # threshold and margin 0
    metrics = Metrics(CollectorRegistry())
    router = ReviewRouter(settings, metrics, clock=FakeClock(), abstain_label="unknown")
    batch = _batch([[0.85, 0.1, 0.05], [0.9, 0.05, 0.05]])
    batch = PublishedBatch(
        records=batch.records,
        texts=batch.texts,
        probabilities=batch.probabilities,
        classes=batch.classes,
        labels=["unknown", "a"],
        model_version=batch.model_version,
        abstained=[True, False],
    )
    out = list(router(batch))
    assert [index for index, _ in out] == [0]
    payload = json.loads(out[0][1].value or b"")
    assert (payload["reason"], payload["label"], payload["top_label"]) == ("abstained", "unknown", "a")


def test_a_review_topic_that_can_never_fire_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(CollectorRegistry())
    with caplog.at_level(logging.WARNING, logger="stream_classifier.learn.review"):
        ReviewRouter(ActiveLearningSettings(topic="review"), metrics)
        ReviewRouter(ActiveLearningSettings(topic="review"), metrics, abstain_label="unknown")
        ReviewRouter(ActiveLearningSettings(topic="review", margin=0.1), metrics)
    assert [r.getMessage() for r in caplog.records] == ["review_never_fires"]
