"""The learning side's whole-topic readers (stream_classifier/transport/reader.py, formerly
learn/tail.py): the transport picks the client, the readers get the security settings and the
pass-through consumer properties, and discovery waits, finds, or fails naming the topics.
Against real brokers: tests/integration/test_security_e2e.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import confluent_kafka as ck
import pytest
from kafka import KafkaConsumer

from stream_classifier import transport
from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError, ConfigError, TransportError
from stream_classifier.learn import feedback, retrainer, updates
from stream_classifier.transport import client_config, reader
from stream_classifier.transport.base import Partition, Record

SECURE = {
    "bootstrap_servers": ["broker-1:9093"],
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "svc",
    "sasl_password": "pa55word",
}


def test_the_learning_side_makes_its_readers_through_the_transport() -> None:
    # feedback, trusted eval and model updates: one factory, which follows kafka.transport.
    for module in (feedback, retrainer, updates):
        assert module.make_reader is transport.make_reader
    assert transport.offsets_key("fb", 3) == "fb:3"


@pytest.mark.parametrize(
    ("name", "module", "cls"),
    [
        ("kafka-python", "stream_classifier.transport.kafka_python_reader", "KafkaPythonReader"),
        ("confluent", "stream_classifier.transport.confluent_reader", "ConfluentReader"),
    ],
)
def test_make_reader_picks_the_client_named_by_kafka_transport(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, cls: str
) -> None:
    made: list[tuple[Any, ...]] = []
    imported = __import__(module, fromlist=[cls])
    monkeypatch.setattr(imported, cls, lambda *args, **kwargs: made.append((args, kwargs)) or "reader")
    settings = KafkaSettings(transport=name)
    assert reader.make_reader(settings, ["fb"], start="end", wait_for_topics_s=2.0) == "reader"
    assert made == [((settings, ["fb"]), {"start": "end", "wait_for_topics_s": 2.0})]


def test_the_kafka_python_reader_gets_security_and_pass_through_properties_but_no_group() -> None:
    settings = KafkaSettings(
        **SECURE, consumer_properties={"fetch_max_wait_ms": 100, "group_id": "sneaky"}, max_request_size=4096
    )
    cfg = client_config.kafka_python_reader_config(settings)
    assert (cfg["security_protocol"], cfg["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("svc", "pa55word")
    assert cfg["fetch_max_wait_ms"] == 100
    assert cfg["group_id"] is None and cfg["enable_auto_commit"] is False
    assert cfg["max_partition_fetch_bytes"] == 1_048_576
    assert cfg["bootstrap_timeout_ms"] == client_config.KAFKA_PYTHON_BOOTSTRAP_TIMEOUT_MS
    assert set(cfg) <= set(KafkaConsumer.DEFAULT_CONFIG)


def test_the_librdkafka_reader_gets_security_and_pass_through_properties_and_librdkafka_takes_them() -> None:
    settings = KafkaSettings(**SECURE, transport="confluent", consumer_properties={"fetch.wait.max.ms": 50})
    cfg = client_config.confluent_reader_config(settings)
    assert (cfg["security.protocol"], cfg["sasl.mechanism"]) == ("sasl_ssl", "SCRAM-SHA-512")
    assert (cfg["sasl.username"], cfg["sasl.password"]) == ("svc", "pa55word")
    assert cfg["fetch.wait.max.ms"] == 50 and cfg["enable.auto.commit"] is False
    ck.Consumer(cfg).close()  # librdkafka validates every name and value when the client is made


def test_no_reader_may_auto_commit_either() -> None:
    for build, name in (
        (client_config.kafka_python_reader_config, "enable_auto_commit"),
        (client_config.confluent_reader_config, "enable.auto.commit"),
    ):
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            build(KafkaSettings(consumer_properties={name: True}))


def test_discovery_waits_for_a_topic_to_appear() -> None:
    calls = {"fb": 0}

    def partitions_of(topic: str) -> list[int]:
        calls[topic] += 1
        return [1, 0] if calls[topic] >= 2 else []

    found = reader.discover(["fb", "fb"], partitions_of, wait_s=5.0, where="b:9092")
    assert found == [Partition("fb", 0), Partition("fb", 1)]


def test_discovery_names_the_topics_still_missing_when_it_gives_up() -> None:
    with pytest.raises(TransportError, match=r"\['gone'\] do not exist on b:9092 \(waited 0 s\)"):
        reader.discover(["fb", "gone"], lambda t: [0] if t == "fb" else [], wait_s=0.0, where="b:9092")


def test_a_denied_topic_fails_discovery_at_once() -> None:
    def partitions_of(topic: str) -> list[int]:
        raise reader.denied_topics_error([topic], "SASL user 'svc'", "opening a reader")

    with pytest.raises(TransportError, match=r"denies topic\(s\) \['fb'\].*SASL user 'svc'.*Read"):
        reader.discover(["fb"], partitions_of, wait_s=30.0, where="b:9092")


def test_the_principal_hint_says_who_the_broker_sees() -> None:
    assert reader.principal_hint(KafkaSettings(**SECURE)) == "SASL user 'svc'"
    assert "client.pem" in reader.principal_hint(
        KafkaSettings(security_protocol="SSL", ssl_certfile="/etc/kafka/client.pem")
    )
    assert reader.principal_hint(KafkaSettings()) == "security protocol PLAINTEXT"


@dataclass
class _Scripted(reader.ReaderBase):
    """A partition with ``end`` records; a poll returns the next one."""

    end: int
    position: int = 0
    _partitions: list[Partition] = field(default_factory=lambda: [Partition("t", 0)])

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Record]:
        if self.position >= self.end:
            return []
        self.position += 1
        return [Record("t", 0, self.position - 1, None, b"v", (), None)]

    def positions(self) -> dict[str, int]:
        return {"t:0": self.position}

    def end_offsets(self) -> dict[str, int]:
        return {"t:0": self.end}


def test_read_to_end_reads_up_to_the_end_offsets_of_now() -> None:
    scripted = _Scripted(end=3)
    assert [r.offset for r in scripted.read_to_end(5.0)] == [0, 1, 2]
    assert scripted.topics == ["t"]


def test_read_to_end_gives_up_as_transient_when_the_end_is_not_reached() -> None:
    stuck = _Scripted(end=3)
    stuck.poll = lambda timeout_s, max_records=500: []  # type: ignore[method-assign]
    with pytest.raises(BrokerUnavailableError, match=r"timed out reading topic\(s\) \['t'\]"):
        stuck.read_to_end(0.0)
