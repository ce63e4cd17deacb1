"""A ``full`` run (body + head) with tiny settings, and a failing run that leaves serving untouched.

Both use the tiny random model: what is tested is the machinery, not the accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.learn.learning import retrain_once, start_learning
from stream_classifier.model.format import load_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import PREFIX, Metrics
from stream_classifier.transport import make_transport
from tests.fixtures.broker import produce, read_all
from tests.integration.retrain_support import good_feedback, learn_settings, seeded_store, send_feedback
from tests.integration.service_support import output_body, running_service, wait_until

pytestmark = pytest.mark.integration


def test_full_mode_trains_body_and_head_in_the_child_process(
    broker: str, topic_factory, kafka_settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    feedback, updates = topic_factory("fb"), topic_factory("upd")
    store = seeded_store(tiny_model_dir, tmp_path / "store")
    seed_version = store.current()[0]
    send_feedback(broker, feedback, good_feedback(with_returns=True))
    settings = learn_settings(kafka_settings(), store.root, feedback, updates, mode="full")

    record = retrain_once(settings, Metrics(CollectorRegistry()), make_transport(settings.kafka), force=True)

    assert record.outcome in {"promoted", "rejected"}, record
    assert record.challenger is not None
    assert set(record.durations) >= {"load", "train", "evaluate"}
    assert record.scores["challenger"]["holdout"].keys() == {"macro_f1", "accuracy", "ece", "log_loss"}
    assert record.calibration["source"] == "held-out"  # the challenger head was calibrated there
    assert record.reason  # the gate says why, either way
    assert "returns" in record.labels
    if record.outcome == "promoted":
        assert store.current()[0] == record.challenger
        bundle = load_model(store.path_of(record.challenger))
        assert bundle.metadata.params["mode"] == "full"
        assert bundle.metadata.params["body"]["steps"] == 2
        assert "returns" in bundle.labels
    else:  # a rejected challenger leaves the store as it was, staging included
        assert store.current()[0] == seed_version
        assert [e.version for e in store.read().versions] == [seed_version]
        assert not list((store.root / "staging").iterdir())


def test_training_failure_leaves_serving_untouched(
    broker: str, topic_factory, kafka_settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    source, out, dlq = topic_factory("in"), topic_factory("out"), topic_factory("dlq")
    feedback, updates = topic_factory("fb"), topic_factory("upd")
    store = seeded_store(tiny_model_dir, tmp_path / "store")
    seed_version = store.current()[0]
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    pairs = good_feedback(with_returns=True)
    # The injected fault: an address-space cap far below what loading a model needs, so the
    # training process fails (MemoryError or worse) the way an out-of-memory trainer would.
    settings = learn_settings(
        kafka, store.root, feedback, updates, max_memory_mb=64, min_new_examples=10_000, interval_s=3600
    )
    send_feedback(broker, feedback, pairs)
    runtime = ModelRuntime.load(store.current()[1], device="cpu", precision="fp32")
    metrics = Metrics(CollectorRegistry())

    with running_service(settings, runtime) as service:
        learning = start_learning(settings, service, metrics, make_transport(kafka))
        assert learning is not None and learning.retrainer is not None and learning.feedback is not None
        try:
            wait_until(learning.feedback.caught_up.is_set, 60, "the feedback rebuild")
            produce(broker, source, [(None, json.dumps({"text": "before", "id": "a"}).encode())])
            assert learning.trigger()
            wait_until(lambda: learning.retrainer.last_record is not None, 120, "the failed run")
            produce(broker, source, [(None, json.dumps({"text": "after", "id": "b"}).encode())])
            outputs = read_all(broker, out, 2)
        finally:
            learning.stop()
        assert service.model_version == seed_version

    record = learning.retrainer.last_record
    assert record is not None
    assert record.outcome == "failed", record
    assert record.reason.startswith("TrainingError:")  # e.g. "MemoryError: Cannot allocate memory"
    assert [output_body(r)["model_version"] for r in outputs] == [seed_version, seed_version]
    assert store.current()[0] == seed_version
    assert [e.version for e in store.read().versions] == [seed_version]
    assert not list((store.root / "staging").iterdir())
    assert metrics.registry.get_sample_value(f"{PREFIX}_retrain_runs_total", {"outcome": "failed"}) == 1
    # The failed run's examples stay fresh: the next tick retries them.
    assert learning.feedback.fresh == len(pairs)
