"""Decisions, routes and enriched outputs on the real broker: both brokers, both transports,
both delivery guarantees.

Every input comes out exactly once, on the topic its decision routes it to; each decision
agrees with its published probabilities and the threshold; the input's fields and headers
(the trace context among them) and its timestamp are carried; the group's offsets reach the
end of the input topic. The model is the tiny random body (fast); thresholds sit at the
median top probability of these very texts, so that both sides of them are exercised.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import pytest
from kafka import KafkaConsumer, TopicPartition

from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import PREFIX
from tests.fixtures.broker import TRANSPORTS, committed_offsets
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.service_support import output_body, running_service, service_settings, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("transport", TRANSPORTS),
    pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"]),
]

N = 24
ABSTAIN = "unknown"
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _inputs() -> list[dict[str, Any]]:
    return [
        {
            "text": f"message {i}: {'refund my card' if i % 3 else 'where is my parcel'} {i * 7}",
            "id": f"d-{i}",
            "customer": {"n": i, "tier": ["gold", "free"][i % 2]},
        }
        for i in range(N)
    ]


def _read_committed(bootstrap: str, topics: list[str], expected: int) -> dict[str, list[Any]]:
    """Every record a read_committed reader sees in ``topics``: until ``expected`` came (or
    60 s passed), then for 2 s more, so that a duplicate would be seen too."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    records: dict[str, list[Any]] = {topic: [] for topic in topics}
    try:
        consumer.assign(
            [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        )
        deadline = time.monotonic() + 60
        quiet_until: float | None = None
        while time.monotonic() < (quiet_until or deadline):
            for tp, batch in consumer.poll(timeout_ms=200).items():
                records[tp.topic].extend(batch)
            if quiet_until is None and sum(map(len, records.values())) >= expected:
                quiet_until = time.monotonic() + 2.0
        return records
    finally:
        consumer.close()


def test_each_input_is_decided_routed_and_enriched_once(
    any_broker: BrokerTarget, tiny_model_dir: Path, transport: str, guarantee: str
) -> None:
    broker, topic = any_broker.bootstrap, any_broker.topic
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    inputs = _inputs()
    probabilities = runtime.predict_proba([value["text"] for value in inputs])
    median = float(statistics.median(float(row.max()) for row in probabilities))
    first = runtime.labels[0]
    source, out, dlq = topic("in", partitions=2), topic("out"), topic("dlq")
    routed, review = topic("routed"), topic("review")
    routes = {first: routed, ABSTAIN: review}
    thresholds = dict.fromkeys(runtime.labels, median)

    producer = ck.Producer({"bootstrap.servers": broker, "batch.num.messages": 1, "linger.ms": 0})
    for i, value in enumerate(inputs):
        headers = [("traceparent", TRACEPARENT), ("tenant", f"t{i}".encode()), ("noise", b"x")]
        producer.produce(
            source,
            json.dumps(value).encode(),
            f"k{i}".encode(),
            partition=i % 2,
            headers=headers,
            timestamp=1_700_000_000_000 + i,
        )
    producer.flush(30)

    kafka = any_broker.settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    settings = service_settings(
        kafka,
        decision={"thresholds": thresholds, "abstain_label": ABSTAIN},
        output={"routes": routes, "include_input": "original", "headers": ["tenant"], "timestamp": "input"},
        processing={"guarantee": guarantee, "commit_interval_ms": 200, "shutdown_timeout_s": 20.0},
    )
    with running_service(settings, runtime) as service:
        wait_until(
            lambda: committed_offsets(broker, kafka.group_id, source) == {0: N // 2, 1: N // 2},
            timeout_s=90,
            what="the group's offsets at the end of the input",
        )
        registry = service.metrics.registry

    by_topic = _read_committed(broker, [out, routed, review, dlq], N)
    assert by_topic.pop(dlq) == []
    seen: dict[str, str] = {}
    for name, records in by_topic.items():
        offsets: dict[int, list[int]] = {}
        for record in records:
            body = output_body(record)
            assert body["id"] not in seen, f"{body['id']} published twice"
            seen[body["id"]] = name
            i = int(body["id"].split("-")[1])
            probs = body["probabilities"]
            top = max(probs, key=probs.__getitem__)
            decided = top if probs[top] >= median else ABSTAIN
            assert (body["label"], body["top_label"], body["abstained"]) == (decided, top, decided == ABSTAIN)
            assert name == routes.get(decided, out)
            assert body["input"] == inputs[i]  # the input object, whole
            headers = dict(record.headers)
            assert headers["traceparent"] == TRACEPARENT and headers["tenant"] == f"t{i}".encode()
            assert "noise" not in headers and headers["label"] == decided.encode()
            assert record.timestamp == 1_700_000_000_000 + i and record.key == f"k{i}".encode()
            offsets.setdefault(body["source"]["partition"], []).append(body["source"]["offset"])
        for partition_offsets in offsets.values():
            assert partition_offsets == sorted(partition_offsets)  # input order within each topic
    assert sorted(seen) == sorted(value["id"] for value in inputs)  # each exactly once
    abstained = sum(1 for t in seen.values() if t == review)
    assert 0 < abstained < N  # both sides of the thresholds were exercised
    for name, records in by_topic.items():
        assert registry.get_sample_value(f"{PREFIX}_outputs_total", {"topic": name}) == len(records)
    assert (
        sum(
            registry.get_sample_value(f"{PREFIX}_abstentions_total", {"label": label}) or 0
            for label in runtime.labels
        )
        == abstained
    )
