"""Issue section 6: a client nobody here wrote. confluent-kafka (librdkafka) produces the inputs
and reads the outputs and dead letters of the service.

Tansu quirk (tests only): a multi-record batch from librdkafka leaves the partition's high
watermark at the batch's first offset + 1, so the producer here sets ``batch.num.messages=1``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer

from stream_classifier.model.runtime import ModelRuntime
from tests.integration.service_support import running_service, service_settings

pytestmark = pytest.mark.integration


def consume(broker: str, topic: str, expected: int, timeout_s: float = 60.0) -> list:  # type: ignore[type-arg]
    consumer = Consumer(
        {
            "bootstrap.servers": broker,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                messages.append(message)
    finally:
        consumer.close()
    return messages


def test_confluent_client_produces_inputs_and_reads_outputs_and_dead_letters(
    broker: str, topic_factory, kafka_settings, tiny_model_dir: Path
) -> None:
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    texts = [
        f"order {i} arrived late and damaged" if i % 2 else f"great service, order {i}" for i in range(20)
    ]
    producer = Producer({"bootstrap.servers": broker, "batch.num.messages": 1, "linger.ms": 0})
    for i, text in enumerate(texts):
        producer.produce(
            source, key=f"c{i}".encode(), value=json.dumps({"text": text, "id": f"c{i}"}).encode()
        )
    producer.produce(source, key=b"bad-1", value=b"not json at all", headers=[("trace", b"t-1")])
    producer.produce(source, key=b"bad-2", value=b'{"no_text": 1}')
    assert producer.flush(30) == 0

    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    with running_service(service_settings(kafka), runtime):
        outputs = consume(broker, out, len(texts))
        letters = consume(broker, dlq, 2)

    assert len(outputs) == len(texts)
    expected = dict(zip([f"c{i}" for i in range(len(texts))], runtime.predict_proba(texts), strict=True))
    for message in outputs:
        body = json.loads(message.value())
        assert message.key() == body["id"].encode()
        np.testing.assert_allclose(list(body["probabilities"].values()), expected[body["id"]], atol=1e-5)
        assert dict(message.headers())["model.version"] == runtime.version.encode()
    reasons = {m.key(): dict(m.headers()) for m in letters}
    assert reasons[b"bad-1"]["error"] == b"invalid_json" and reasons[b"bad-1"]["trace"] == b"t-1"
    assert reasons[b"bad-2"]["error"] == b"missing_text"
    assert {m.value() for m in letters} == {b"not json at all", b'{"no_text": 1}'}
