"""Hostile records on the real broker: valid Kafka, each one a way to crash, stall or loop a
consumer. Every one is followed by ordinary records; the service must stay up (no restart),
give every ordinary record exactly one output, give every hostile one an output or a dead
letter with its reason, and commit the group's offsets to the end of the topic.
"""

from __future__ import annotations

import json
from pathlib import Path

import confluent_kafka as ck
import pytest
from kafka import KafkaProducer

from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import PREFIX
from tests.fixtures.broker import TRANSPORTS, committed_offsets, read_all
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.service_support import output_body, running_service, service_settings, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("transport", TRANSPORTS)]

MAX_REQUEST = 2_048


class _RawHeaderKey(str):
    """A header name that kafka-python writes as raw, non-UTF-8 bytes (a hostile producer)."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfehostile"


def _ordinary(i: int) -> bytes:
    return json.dumps({"text": f"an ordinary message number {i}", "id": f"ok-{i}"}).encode()


# (expected: "output" or a dead-letter reason, key, value, headers); header values may be None.
HOSTILE: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
    ("invalid_text", b"h-text", b'{"text": "lone \\ud800 surrogate"}', []),
    ("invalid_id", b"h-id", b'{"text": "fine text", "id": "\\udfff"}', []),
    ("null_value", None, None, [("trace", None)]),  # a keyless tombstone with a null header value
    ("output", b"h-null-header", b'{"text": "fine text", "id": "nh"}', [("trace", None), ("x", b"1")]),
    ("output_too_large", b"k" * (MAX_REQUEST + 100), b'{"text": "fine text"}', []),
    ("invalid_json", b"k" * (MAX_REQUEST + 100), b"{not json", [("h", b"v" * 100)]),
    # the input fits, but its key + output do not: a minimal dead letter
    (
        "output_too_large",
        b"k" * 1_750,
        json.dumps({"text": "y", "id": "i" * 200}).encode(),
        [("h", b"v" * 100)],
    ),
]


def _produce(bootstrap: str, topic: str) -> tuple[int, dict[int, str]]:
    """Ordinary and hostile records, interleaved; returns (count, offset -> expected outcome)."""
    producer = ck.Producer({"bootstrap.servers": bootstrap, "batch.num.messages": 1, "linger.ms": 0})
    expected: dict[int, str] = {}
    offset = 0

    def send(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
        producer.produce(topic, value, key, headers=headers, partition=0)
        producer.flush(30)

    for i, (outcome, key, value, headers) in enumerate(HOSTILE):
        send(f"before-{i}".encode(), _ordinary(i), [])
        expected[offset] = "output"
        send(key, value, headers)
        expected[offset + 1] = outcome
        offset += 2
    # A header name that is not UTF-8, in a batch of its own (kafka-python cannot parse it).
    raw = KafkaProducer(bootstrap_servers=bootstrap)
    raw.send(topic, value=b'{"text": "raw header"}', headers=[(_RawHeaderKey("x"), b"v")], partition=0)
    raw.flush(30)
    raw.close()
    expected[offset] = "raw_header"
    offset += 1
    for i in range(len(HOSTILE), len(HOSTILE) + 3):
        send(f"after-{i}".encode(), _ordinary(i), [])
        expected[offset] = "output"
        offset += 1
    return offset, expected


def test_hostile_records_never_stop_the_stream(
    any_broker: BrokerTarget, tiny_model_dir: Path, transport: str
) -> None:
    """On both brokers and both transports."""
    broker, topic_factory, kafka_settings = any_broker.bootstrap, any_broker.topic, any_broker.settings
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    source, out, dlq = topic_factory("in"), topic_factory("out"), topic_factory("dlq")
    total, expected = _produce(broker, source)
    kafka = kafka_settings(
        input_topics=[source], output_topic=out, dead_letter_topic=dlq, max_request_size=MAX_REQUEST
    )
    settings = service_settings(kafka, input={"max_bytes": 1_500}, batching={"max_wait_ms": 100})
    n_outputs = sum(1 for outcome in expected.values() if outcome == "output")
    n_letters = total - n_outputs

    with running_service(settings, runtime) as service:
        # raw_header: librdkafka may read it (an output) or not (a dead letter); count both
        wait_until(
            lambda: committed_offsets(broker, settings.kafka.group_id, source).get(0) == total, timeout_s=120
        )
        outputs = read_all(broker, out, n_outputs, timeout_s=10)
        letters = read_all(broker, dlq, n_letters, timeout_s=10)
        registry = service.metrics.registry

    by_offset_out = {output_body(r)["source"]["offset"]: r for r in outputs}
    by_offset_dlq = {int(dict(r.headers)["source.offset"]): r for r in letters}
    assert len(by_offset_out) == len(outputs)  # no record has two outputs
    assert len(by_offset_dlq) == len(letters)  # nor two dead letters
    for offset, outcome in expected.items():
        if outcome == "output":
            assert offset in by_offset_out and offset not in by_offset_dlq, offset
        elif outcome == "raw_header":
            assert (offset in by_offset_out) != (offset in by_offset_dlq)
            if offset in by_offset_dlq:
                assert dict(by_offset_dlq[offset].headers)["error"] == b"unreadable_record"
        else:
            letter = by_offset_dlq[offset]
            headers = dict(letter.headers)
            assert headers["error"] == outcome.encode(), (offset, headers)
            assert len(letter.value or b"") + len(letter.key or b"") <= MAX_REQUEST
    ordinary = sorted(output_body(r)["id"] for r in outputs if str(output_body(r)["id"]).startswith("ok-"))
    assert ordinary == sorted(f"ok-{i}" for i in range(len(HOSTILE) + 3))
    for reason in ("invalid_text", "invalid_id", "null_value", "output_too_large", "invalid_json"):
        assert registry.get_sample_value(f"{PREFIX}_dead_letters_total", {"reason": reason}) >= 1
