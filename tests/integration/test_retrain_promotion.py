"""Feedback -> retraining -> promotion -> hot swap, with the real broker and the real MiniLM.

One service serves while the trainer (same process, the ``serve`` wiring) rebuilds the
feedback set, trains a head-mode challenger in its child process, promotes it and swaps it
in. Inputs keep flowing across the swap: every input must come out exactly once, each
partition switches version once, and a class that only feedback knew is predicted after.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.learn.learning import start_learning
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import PREFIX, Metrics
from stream_classifier.transport import make_transport
from tests.fixtures.broker import produce, read_all
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.retrain_support import good_feedback, learn_settings, seeded_store, send_feedback
from tests.integration.service_support import output_body, running_service, wait_until

pytestmark = pytest.mark.integration

UNSEEN_RETURNS = [
    "I would like to return the blender I bought",
    "how can I send this order back for a refund",
    "please help me return these headphones",
]
FILLER = ["my parcel is late", "I was charged twice", "the app crashes", "where is my order"]


def test_feedback_retrains_promotes_and_swaps_without_loss(
    any_broker: BrokerTarget, minilm_model_dir: Path, tmp_path: Path
) -> None:
    """Feedback and the model-updates topic on the broker under test: Apache Kafka, or Tansu
    where Java is missing (the Tansu twin proves nothing more and costs CI ~16 s)."""
    any_broker.only_on_apache_kafka_where_it_runs("retraining with a hot swap")
    broker, topic_factory, kafka_settings = any_broker.bootstrap, any_broker.topic, any_broker.settings
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    feedback, updates = topic_factory("fb"), topic_factory("upd")
    store = seeded_store(minilm_model_dir, tmp_path / "store")
    seed_version = store.current()[0]
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    pairs = good_feedback(with_returns=True)
    settings = learn_settings(kafka, store.root, feedback, updates, min_new_examples=len(pairs))
    send_feedback(broker, feedback, pairs, id_prefix="fb-")

    runtime = ModelRuntime.load(store.current()[1], device="cpu", precision="fp32")
    sent: list[str] = []
    stop_producing = threading.Event()

    def keep_producing() -> None:
        i = 0
        while not stop_producing.is_set():
            ident = f"m{i}"
            produce(
                broker, source, [(ident.encode(), json.dumps({"text": FILLER[i % 4], "id": ident}).encode())]
            )
            sent.append(ident)
            i += 1
            time.sleep(0.05)

    metrics = Metrics(CollectorRegistry())
    with running_service(settings, runtime) as service:
        learning = start_learning(settings, service, metrics, make_transport(kafka))
        assert learning is not None and learning.retrainer is not None
        producer = threading.Thread(target=keep_producing, daemon=True)
        producer.start()
        try:
            wait_until(lambda: learning.retrainer.last_record is not None, 300, "a retraining run")
            record = learning.retrainer.last_record
            assert record is not None
            assert record.outcome == "promoted", record
            assert "returns" in record.labels
            assert set(record.durations) >= {"load", "train", "evaluate", "swap"}
            wait_until(lambda: service.model_version == record.challenger, 60, "the swap")
            swapped_at = len(sent)  # a little traffic after the swap too
            wait_until(lambda: len(sent) >= swapped_at + 10, 60, "traffic after the swap")
        finally:
            stop_producing.set()
            producer.join()
            learning.stop()
        produce(
            broker,
            source,
            [
                (f"r{i}".encode(), json.dumps({"text": t, "id": f"r{i}"}).encode())
                for i, t in enumerate(UNSEEN_RETURNS)
            ],
        )
        outputs = read_all(broker, out, len(sent) + len(UNSEEN_RETURNS), timeout_s=120)

    assert store.current()[0] == record.challenger
    assert store.read().entry(record.challenger).parent == seed_version
    assert metrics.registry.get_sample_value(f"{PREFIX}_retrain_runs_total", {"outcome": "promoted"}) == 1

    bodies = [output_body(r) for r in outputs]
    ids = [b["id"] for b in bodies]
    assert sorted(ids) == sorted(
        sent + [f"r{i}" for i in range(len(UNSEEN_RETURNS))]
    )  # none lost, none twice
    versions_by_partition: dict[int, list[str]] = defaultdict(list)
    for body in sorted(bodies, key=lambda b: (b["source"]["partition"], b["source"]["offset"])):
        versions_by_partition[body["source"]["partition"]].append(body["model_version"])
    for versions in versions_by_partition.values():
        switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
        assert switches <= 1
        assert set(versions) <= {seed_version, record.challenger}
    assert any(b["model_version"] == seed_version for b in bodies)
    returns = [b for b in bodies if b["id"].startswith("r")]
    assert all(b["model_version"] == record.challenger for b in returns)
    assert sum(b["label"] == "returns" for b in returns) >= 2, returns
