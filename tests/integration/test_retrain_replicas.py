"""Two serving replicas follow the version the trainer publishes, and a CLI rollback.

Both brokers (Tansu and Apache Kafka), real MiniLM. The replicas run without retraining but
with the shared model store; the trainer is ``stream-classifier retrain``'s code path; the rollback is the
``models promote`` command itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_classifier.cli import main
from stream_classifier.config import Settings
from stream_classifier.learn.learning import Learning, retrain_once, start_learning
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.service import StreamService
from stream_classifier.transport import make_transport
from tests.fixtures.broker import produce
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.retrain_support import good_feedback, learn_settings, seeded_store, send_feedback
from tests.integration.service_support import running_service

pytestmark = pytest.mark.integration


@contextmanager
def replica(settings: Settings, runtime: ModelRuntime) -> Iterator[tuple[StreamService, Learning]]:
    with running_service(settings, runtime) as service:
        learning = start_learning(
            settings, service, Metrics(CollectorRegistry()), make_transport(settings.kafka)
        )
        assert learning is not None and learning.retrainer is None  # serving only
        try:
            yield service, learning
        finally:
            learning.stop()


def serve_until_all_on(broker: str, topic: str, services: list[StreamService], version: str) -> None:
    """Keep traffic on both partitions (a swap applies between batches) until all serve ``version``."""
    deadline = time.monotonic() + 120
    while not all(s.model_version == version for s in services):
        assert time.monotonic() < deadline, f"replicas serve {[s.model_version for s in services]}"
        for partition in (0, 1):
            produce(broker, topic, [(None, b'{"text": "where is my parcel"}')], partition=partition)
        time.sleep(0.5)


def test_two_replicas_pick_up_the_published_version_and_a_rollback(
    any_broker: BrokerTarget, minilm_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Feedback and the model-updates topic on the broker under test: Apache Kafka, or Tansu
    where Java is missing (the Tansu twin proves nothing more and costs CI ~16 s)."""
    any_broker.only_on_apache_kafka_where_it_runs("replicas following the model-updates topic")
    broker, topic_factory, kafka_settings = any_broker.bootstrap, any_broker.topic, any_broker.settings
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    feedback, updates = topic_factory("fb"), topic_factory("upd")
    store = seeded_store(minilm_model_dir, tmp_path / "store")
    seed_version, seed_dir = store.current()
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    trainer = learn_settings(kafka, store.root, feedback, updates)
    serving = learn_settings(kafka, store.root, feedback, updates, enabled=False, manifest_poll_s=3600)
    send_feedback(broker, feedback, good_feedback(with_returns=True))

    with ExitStack() as stack:
        replicas = [
            stack.enter_context(replica(serving, ModelRuntime.load(seed_dir, device="cpu", precision="fp32")))
            for _ in range(2)
        ]
        record = retrain_once(trainer, Metrics(CollectorRegistry()), make_transport(kafka), force=True)
        assert record.outcome == "promoted", record
        # manifest_poll_s is an hour: only the announcement can make this happen in time.
        serve_until_all_on(broker, source, [s for s, _ in replicas], record.challenger)

        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(json.loads(serving.model_dump_json())))
        assert main(["models", "--config", str(config), "list"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert listed["current"] == record.challenger
        assert [v["version"] for v in listed["versions"]] == [seed_version, record.challenger]
        assert listed["versions"][1]["parent"] == seed_version
        assert listed["versions"][1]["data_size"] == record.examples["train"]

        assert main(["models", "--config", str(config), "promote", seed_version]) == 0
        serve_until_all_on(broker, source, [s for s, _ in replicas], seed_version)
    assert store.current()[0] == seed_version
