"""Broker pause: SIGSTOP the broker mid-stream, SIGCONT it later. The service recovers by
itself, loses nothing and does not exit. Uses a broker of its own, not the session's: a
Tansu process, or an Apache Kafka JVM from ``kafka_broker_factory``."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import NamedTuple

import pytest
from kafka import KafkaAdminClient

from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics
from stream_classifier.model.runtime import ModelRuntime
from tests.faults.support import CI, SCALES, Scale, message, model_for, output_ids
from tests.fixtures.broker import TRANSPORTS, produce
from tests.fixtures.kafka_broker import APACHE_KAFKA, BROKERS, create_kafka_topics
from tests.integration.service_support import TopicReader, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.integration]


class PausableBroker(NamedTuple):
    bootstrap: str
    pid: int
    is_tansu: bool


@pytest.fixture(params=BROKERS)
def pausable_broker(request: pytest.FixtureRequest) -> Iterator[PausableBroker]:
    """A private broker with topics ``in`` (2 partitions), ``out`` and ``dlq``."""
    with ExitStack() as stack:
        if request.param == APACHE_KAFKA:
            start: Callable[..., object] = request.getfixturevalue("kafka_broker_factory")
            cluster = start()
            bootstrap, pid = cluster.plaintext, cluster.pid  # type: ignore[attr-defined]
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            stack.callback(admin.close)
            create_kafka_topics(admin, ["in"], partitions=2)
            create_kafka_topics(admin, ["out", "dlq"])
        else:
            tansu = stack.enter_context(EmbeddedBroker())
            bootstrap, pid = tansu.bootstrap_servers, tansu.pid
            create_topics(bootstrap, ["in"], partitions=2)
            create_topics(bootstrap, ["out", "dlq"])
        assert pid is not None
        yield PausableBroker(bootstrap, pid, request.param != APACHE_KAFKA)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("scale", SCALES)
def test_broker_pause_recovers_without_loss(
    kafka_settings,
    pausable_broker: PausableBroker,
    request: pytest.FixtureRequest,
    scale: Scale,
    transport: str,
) -> None:
    if transport == "confluent" and scale is CI:
        pytest.skip("CI pauses the broker under the default transport; soak mode covers librdkafka too")
    runtime = ModelRuntime.load(model_for(scale, request), device="cpu", precision="fp32")
    n = scale.messages // 3
    bootstrap, pid, is_tansu = pausable_broker
    # kafka_settings carries Tansu's work-arounds; on Apache Kafka they are taken back out.
    untuned = {} if is_tansu else {"producer_properties": {}}
    kafka = kafka_settings(
        bootstrap_servers=[bootstrap],
        input_topics=["in"],
        output_topic="out",
        dead_letter_topic="dlq",
        **untuned,
    )
    settings = service_settings(kafka, batching={"max_batch_size": 16, "max_wait_ms": 10})
    produce(bootstrap, "in", [(None, message(i)) for i in range(n)])
    reader = TopicReader(bootstrap, "out")
    try:
        with running_service(settings, runtime) as service:
            reader.wait_for(lambda records: len(records) >= 1, 120, "the first output")
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(scale.pause_s)
                # A broker outage never fails liveness: the loop ticks or waits on the broker.
                assert service.health.snapshot().live
            finally:
                os.kill(pid, signal.SIGCONT)
            produce(bootstrap, "in", [(None, message(i)) for i in range(n, 2 * n)])
            expected = {f"m{i}" for i in range(2 * n)}
            reader.wait_for(lambda records: set(output_ids(records)) == expected, 240, "every message")
            assert service.health.snapshot().ready  # rejoined, and the producer is connected
            # running_service asserts, on leaving, that run() neither raised nor stopped early.
    finally:
        reader.close()
