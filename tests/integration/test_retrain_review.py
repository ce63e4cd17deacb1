"""Active learning through the real service and broker: uncertain predictions copied, rate-capped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.config import KafkaSettings, Settings
from stream_classifier.learn.review import ReviewRouter
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from tests.fixtures.broker import TopicFactory, produce, read_all
from tests.integration.service_support import running_service, service_settings, wait_until

pytestmark = pytest.mark.integration


def _count(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"stream_classifier_{name}_total")
    assert value is not None, name
    return value


def _setup(
    topic_factory: TopicFactory,
    kafka_settings: Callable[..., KafkaSettings],
    model_dir: Path,
    *,
    threshold: float,
    max_per_second: float,
) -> tuple[Settings, ModelRuntime, str, str]:
    """Settings with active learning on, the loaded model, and the input and review topics."""
    source, out, dlq, review = (
        topic_factory("in"),
        topic_factory("out"),
        topic_factory("dlq"),
        topic_factory("rev"),
    )
    runtime = ModelRuntime.load(model_dir, device="cpu", precision="fp32")
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    settings = service_settings(
        kafka, active_learning={"topic": review, "threshold": threshold, "max_per_second": max_per_second}
    )
    return settings, runtime, source, review


def _run(
    settings: Settings, runtime: ModelRuntime, n: int, broker: str, source: str, *, uncertain: int
) -> tuple[Metrics, list]:
    """Serve ``n`` messages with the review router as the publish hook; wait until each is judged."""
    metrics = Metrics(CollectorRegistry())
    router = ReviewRouter(settings.active_learning, metrics)
    produce(
        broker,
        source,
        [(f"k{i}".encode(), json.dumps({"text": f"text {i}", "id": i}).encode()) for i in range(n)],
    )
    with running_service(settings, runtime, publish_hook=router):
        outputs = read_all(broker, settings.kafka.output_topic, n)
        assert len(outputs) == n  # every prediction is published, copied or not
        judged = lambda: _count(metrics, "review_routed") + _count(metrics, "review_rate_limited")  # noqa: E731
        wait_until(lambda: judged() >= uncertain, 30, "every uncertain prediction judged")
    return metrics, outputs


def test_uncertain_predictions_go_to_review_under_the_rate_cap(
    broker: str, topic_factory, kafka_settings, tiny_model_dir: Path
) -> None:
    # Threshold 1: every prediction is uncertain. At 0.5 copies/s (burst 1), a batch of 16
    # handled at one instant can copy only one of them.
    settings, runtime, source, review = _setup(
        topic_factory, kafka_settings, tiny_model_dir, threshold=1.0, max_per_second=0.5
    )
    n = 30

    metrics, outputs = _run(settings, runtime, n, broker, source, uncertain=n)

    routed = int(_count(metrics, "review_routed"))
    limited = int(_count(metrics, "review_rate_limited"))
    assert routed + limited == n
    assert 1 <= routed < n
    assert limited > 0
    copies = read_all(broker, review, routed)
    assert len(copies) == routed
    version = runtime.version
    by_offset = {json.loads(o.value)["source"]["offset"]: json.loads(o.value) for o in outputs}
    for copy in copies:
        body = json.loads(copy.value)
        assert body["model_version"] == version
        assert body["reason"] == "low_confidence"
        assert body["probabilities"] == by_offset[body["source"]["offset"]]["probabilities"]
        assert body["text"] == f"text {body['source']['offset']}"
        assert copy.key == f"k{body['source']['offset']}".encode()
        # A labeller answers with the copy's text and a label on a feedback topic.
        assert set(body) >= {"text", "probabilities", "model_version"}


def test_confident_predictions_are_not_copied(
    broker: str, topic_factory, kafka_settings, tiny_model_dir: Path
) -> None:
    # Any top probability of a 3-class model is >= 1/3, and margin 0 never triggers.
    settings, runtime, source, review = _setup(
        topic_factory, kafka_settings, tiny_model_dir, threshold=0.3, max_per_second=100
    )

    metrics, _ = _run(settings, runtime, 10, broker, source, uncertain=0)

    assert _count(metrics, "review_routed") == 0
    assert read_all(broker, review, 1, timeout_s=3) == []
