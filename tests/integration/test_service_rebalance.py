"""Two instances in one consumer group: partitions move between them and nothing is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from stream_classifier.model.runtime import ModelRuntime
from tests.fixtures.broker import TRANSPORTS, TopicFactory, committed_offsets, produce
from tests.fixtures.kafka_broker import ApacheKafka, BrokerTarget, kafka_settings_factory
from tests.integration.service_support import (
    TopicReader,
    output_body,
    running_service,
    service_settings,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rebalance_between_two_instances_loses_nothing(
    any_broker: BrokerTarget, tiny_model_dir: Path, transport: str
) -> None:
    """On both brokers and both transports."""
    broker, topic_factory, kafka_settings = any_broker.bootstrap, any_broker.topic, any_broker.settings
    source, out, dlq = topic_factory("in", partitions=4), topic_factory("out"), topic_factory("dlq")
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    settings = service_settings(kafka, batching={"max_batch_size": 4, "max_wait_ms": 10})
    # One runtime each: a fast tokenizer must not be shared by two threads at once.
    runtimes = [ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32") for _ in range(2)]
    n = 400
    stop_feeding = threading.Event()

    def feed() -> None:
        producer = KafkaProducer(bootstrap_servers=broker)
        for i in range(n):
            producer.send(
                source, key=f"k{i % 13}".encode(), value=f'{{"text": "text {i}", "id": "m{i}"}}'.encode()
            )
            time.sleep(0.02)
            if stop_feeding.is_set():
                break
        producer.flush()
        producer.close()

    reader = TopicReader(broker, out)
    feeder = threading.Thread(target=feed)
    try:
        with running_service(settings, runtimes[0]) as first:
            feeder.start()
            reader.wait_for(lambda records: len(records) >= 20, 60, "outputs from the first instance")
            with running_service(settings, runtimes[1]) as second:
                wait_until(
                    lambda: second.health.snapshot().consumer_joined, 60, "the second instance to join"
                )
                wait_until(lambda: len(second.assignment) > 0, 60, "a share for the second instance")
                # The first learns of its new share on its own next poll (kafka-python runs the
                # rebalance callbacks there), possibly after the second has its share.
                wait_until(lambda: len(first.assignment) < 4, 60, "the first to give up a share")
                # The second does work of its own before it leaves: a new output from a
                # partition it holds.
                mark = len(reader.read())
                held = {p.partition for p in second.assignment}
                reader.wait_for(
                    lambda rs: any(output_body(r)["source"]["partition"] in held for r in rs[mark:]),
                    60,
                    "an output from the second instance's share",
                )
            # The second instance left: the first takes all partitions back.
            wait_until(lambda: len(first.assignment) == 4, 60, "the first to take everything back")
            feeder.join(timeout=60)
            every = {f"m{i}" for i in range(n)}
            records = reader.wait_for(lambda rs: {output_body(r)["id"] for r in rs} >= every, 120)
            wait_until(
                lambda: sum(c or 0 for c in committed_offsets(broker, kafka.group_id, source).values()) == n,
                60,
                "every offset committed",
            )
    finally:
        stop_feeding.set()
        reader.close()
    ids = [output_body(r)["id"] for r in records]
    assert set(ids) == {f"m{i}" for i in range(n)}
    # Per key (one partition each), the first output of each message comes in input order.
    first_seen: dict[str, int] = {}
    for position, record in enumerate(records):
        first_seen.setdefault(output_body(record)["id"], position)
    for key in range(13):
        order = [first_seen[f"m{i}"] for i in range(key, n, 13)]
        assert order == sorted(order)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_revoked_partition_leaves_no_state_behind_on_apache_kafka(
    kafka_cluster: ApacheKafka, kafka_topic_factory: TopicFactory, tiny_model_dir: Path, transport: str
) -> None:
    """Acknowledged, uncommitted offsets at a revoke (commits only at shutdown here): the
    partition moves to B, B goes on with it and commits, then it comes back to A. A must not
    commit its old commit point over B's (the group's offset would go back, and a restart
    re-read what B did). librdkafka calls on_revoke while ``assignment()`` still lists the
    partitions being revoked; kafka-python after they went."""
    broker = kafka_cluster.plaintext
    source, out, dlq = (
        kafka_topic_factory("in", partitions=2),
        kafka_topic_factory("out"),
        kafka_topic_factory("dlq"),
    )
    kafka = kafka_settings_factory(kafka_cluster, transport)(
        input_topics=[source], output_topic=out, dead_letter_topic=dlq
    )
    settings = service_settings(
        kafka, batching={"max_batch_size": 4, "max_wait_ms": 10}, processing={"commit_interval_ms": 600_000}
    )
    runtimes = [ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32") for _ in range(2)]

    def feed(first: int, last: int) -> None:
        for partition in (0, 1):
            batch = [
                (None, f'{{"text": "text {i}", "id": "m{i}"}}'.encode())
                for i in range(first + partition, last, 2)
            ]
            produce(broker, source, batch, partition=partition)

    feed(0, 20)
    reader = TopicReader(broker, out)
    try:
        with running_service(settings, runtimes[0]) as first:
            reader.wait_for(lambda rs: len(rs) >= 20, 60, "20 outputs from A")
            with running_service(settings, runtimes[1]) as second:
                wait_until(lambda: len(second.assignment) == 1, 60, "B to take a partition")
                wait_until(lambda: len(first.assignment) == 1, 60, "A to give it up")
                feed(20, 22)
                reader.wait_for(
                    lambda rs: {"m20", "m21"} <= {output_body(r)["id"] for r in rs}, 60, "m20, m21"
                )
            wait_until(lambda: len(first.assignment) == 2, 60, "A to take everything back")
            # A's own partition came back too: kafka-python goes on from A's position,
            # librdkafka reads it again from its committed offset (none yet), 11 outputs more.
            total = 22 + (11 if transport == "confluent" else 0)
            reader.wait_for(lambda rs: len(rs) >= total, 60, f"{total} outputs in all")
    finally:
        reader.close()
    assert committed_offsets(broker, kafka.group_id, source) == {0: 11, 1: 11}
