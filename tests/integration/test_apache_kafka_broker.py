"""The Apache Kafka test broker itself (tests/fixtures/kafka_broker.py): both client
libraries produce and consume, in a consumer group that commits, over PLAINTEXT, SASL_SSL
with SCRAM-SHA-512 and mutual TLS; a wrong password and a missing client certificate are
refused; a DENY ACL gives TopicAuthorizationFailed to exactly the principal it names, and a
strict authorizer (a private broker) denies whatever no ACL allows; ``any_broker`` hands out
Tansu's quirk work-arounds on Tansu only."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import confluent_kafka
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from tests.fixtures.broker import produce, read_all
from tests.fixtures.kafka_broker import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    APACHE_KAFKA,
    LISTENERS,
    SCRAM_PRINCIPAL,
    SSL_PRINCIPAL,
    TANSU,
    AclHelper,
    ApacheKafka,
    BrokerTarget,
    Listener,
    TopicFactory,
    create_kafka_topics,
)

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

CLIENTS = ["kafka-python", "confluent"]
MESSAGES = 5
DEADLINE_S = 30.0
POLL_MS = 5_000


def kafka_python_roundtrip(
    config: dict[str, Any], topic: str, values: list[bytes]
) -> tuple[list[bytes], int | None]:
    """Produce ``values``, consume them in a fresh group that commits; returns what was read
    and the group's committed offset.

    Each poll waits up to :data:`POLL_MS`. kafka-python 3.0.12 loses a rejoin whose poll
    timer runs out between its assignment and its SyncGroup response (the consumer then
    keeps no partitions, heartbeats off); on Apache Kafka the first join usually completes
    before the topic's metadata arrives, so a second join follows at once. A long poll
    timer keeps that second join inside one poll.
    """
    producer = KafkaProducer(**config, acks="all")
    try:
        for value in values:
            producer.send(topic, value=value).get(timeout=DEADLINE_S)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        topic,
        **config,
        group_id=f"g-{uuid.uuid4().hex[:10]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        read: list[bytes] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(read) < len(values) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=POLL_MS).values():
                read.extend(record.value for record in batch)
        consumer.commit()
        return read, consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


def confluent_roundtrip(
    config: dict[str, Any], topic: str, values: list[bytes]
) -> tuple[list[bytes], int | None]:
    """The same with confluent-kafka (librdkafka)."""
    errors: list[Any] = []
    producer = confluent_kafka.Producer({**config, "acks": "all"})
    for value in values:
        producer.produce(topic, value, on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(DEADLINE_S) == 0, "librdkafka did not deliver every message in time"
    assert errors == []
    consumer = confluent_kafka.Consumer(
        {
            **config,
            "group.id": f"g-{uuid.uuid4().hex[:10]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        read: list[bytes] = []
        deadline = time.monotonic() + DEADLINE_S
        while len(read) < len(values) and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            read.append(message.value())
        consumer.commit(asynchronous=False)
        (committed,) = consumer.committed([confluent_kafka.TopicPartition(topic, 0)], timeout=DEADLINE_S)
        return read, committed.offset
    finally:
        consumer.close()


def client_config(
    cluster: ApacheKafka, client: str, listener: Listener, **credentials: str
) -> dict[str, Any]:
    if client == "kafka-python":
        return cluster.kafka_python_config(listener, **credentials)
    return cluster.librdkafka_config(listener, **credentials)


def roundtrip(
    client: str, config: dict[str, Any], topic: str, values: list[bytes]
) -> tuple[list[bytes], int | None]:
    if client == "kafka-python":
        return kafka_python_roundtrip(config, topic, values)
    return confluent_roundtrip(config, topic, values)


def produce_one_with_librdkafka(config: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Try to produce one message within 3 s; returns the client errors (``error_cb``) and
    the delivery reports (an error, or None when the message was delivered)."""
    errors: list[Any] = []
    reports: list[Any] = []
    producer = confluent_kafka.Producer({**config, "error_cb": errors.append, "message.timeout.ms": 3_000})
    producer.produce("never-written", b"x", on_delivery=lambda err, _msg: reports.append(err))
    producer.flush(10)
    return errors, reports


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("listener", LISTENERS)
def test_produce_and_consume_in_a_group_on_every_listener(
    kafka_cluster: ApacheKafka, kafka_topic_factory: TopicFactory, listener: Listener, client: str
) -> None:
    topic = kafka_topic_factory("roundtrip")
    values = [f"{listener}/{client}/{i}".encode() for i in range(MESSAGES)]

    read, committed = roundtrip(client, client_config(kafka_cluster, client, listener), topic, values)

    assert read == values
    assert committed == MESSAGES


def test_wrong_scram_password_is_refused_kafka_python(kafka_cluster: ApacheKafka) -> None:
    config = kafka_cluster.kafka_python_config("SASL_SSL", password="not-the-password")
    mark = kafka_cluster.log_size()

    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaProducer(**config, bootstrap_timeout_ms=3_000)

    # kafka-python retries until its bootstrap deadline, and over TLS it reads the broker's
    # SaslAuthenticate error only now and then (the broker closes the connection right
    # after it; librdkafka always reads it): the broker's log names the cause every time.
    assert re.search(
        r"Failed authentication with /127\.0\.0\.1 .*invalid credentials with SASL mechanism SCRAM-SHA-512",
        kafka_cluster.log_since(mark),
    )


def test_wrong_scram_password_is_refused_confluent(kafka_cluster: ApacheKafka) -> None:
    config = kafka_cluster.librdkafka_config("SASL_SSL", password="not-the-password")

    errors, reports = produce_one_with_librdkafka(config)

    assert reports and reports[0] is not None, "a message was delivered with a wrong password"
    codes = {error.code() for error in errors}
    assert confluent_kafka.KafkaError._AUTHENTICATION in codes, errors
    assert any("invalid credentials" in error.str() for error in errors), errors


def test_mtls_listener_refuses_a_client_without_a_certificate(kafka_cluster: ApacheKafka) -> None:
    config = kafka_cluster.librdkafka_config("SSL")
    del config["ssl.certificate.location"], config["ssl.key.location"]

    errors, reports = produce_one_with_librdkafka(config)

    assert reports and reports[0] is not None, "a message was delivered without a client certificate"
    assert any("certificate" in error.str() for error in errors), errors

    kafka_python = kafka_cluster.kafka_python_config("SSL")
    del kafka_python["ssl_certfile"], kafka_python["ssl_keyfile"]
    mark = kafka_cluster.log_size()
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaProducer(**kafka_python, bootstrap_timeout_ms=3_000)
    assert "(SSL handshake failed)" in kafka_cluster.log_since(mark)


@pytest.mark.parametrize(
    ("listener", "principal"), [("SASL_SSL", SCRAM_PRINCIPAL), ("SSL", SSL_PRINCIPAL)], ids=["scram", "mtls"]
)
def test_denied_topic_fails_with_topic_authorization_failed(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: TopicFactory,
    kafka_acls: AclHelper,
    listener: Listener,
    principal: str,
) -> None:
    denied = kafka_topic_factory("denied")
    allowed = kafka_topic_factory("allowed")
    kafka_acls.deny_topic(denied, principal=principal)

    producer = KafkaProducer(**kafka_cluster.kafka_python_config(listener), max_block_ms=10_000)
    try:
        with pytest.raises(TopicAuthorizationFailedError, match=denied):
            producer.send(denied, b"refused").get(timeout=DEADLINE_S)
        producer.send(allowed, b"fine").get(timeout=DEADLINE_S)
    finally:
        producer.close()

    reports: list[Any] = []
    rdkafka = confluent_kafka.Producer(kafka_cluster.librdkafka_config(listener))
    rdkafka.produce(denied, b"refused", on_delivery=lambda err, _msg: reports.append(err))
    rdkafka.produce(allowed, b"fine", on_delivery=lambda err, _msg: reports.append(err))
    assert rdkafka.flush(DEADLINE_S) == 0
    assert [err.code() if err else None for err in reports] == [
        confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED,
        None,
    ]

    # The super user on PLAINTEXT is not bound by the ACL.
    produce(kafka_cluster.plaintext, denied, [(None, b"admin")])
    assert [r.value for r in read_all(kafka_cluster.plaintext, denied, 1)] == [b"admin"]


def test_a_strict_authorizer_denies_what_no_acl_allows(kafka_broker_factory: Any) -> None:
    strict = kafka_broker_factory({"allow.everyone.if.no.acl.found": "false"})
    admin = KafkaAdminClient(bootstrap_servers=strict.plaintext)
    try:
        create_kafka_topics(admin, ["no-acl"])
    finally:
        admin.close()

    producer = KafkaProducer(**strict.kafka_python_config("SASL_SSL"), max_block_ms=10_000)
    try:
        with pytest.raises(TopicAuthorizationFailedError, match="no-acl"):
            producer.send("no-acl", b"refused").get(timeout=DEADLINE_S)
    finally:
        producer.close()
    admin_user = KafkaProducer(
        **strict.kafka_python_config("SASL_SSL", username=ADMIN_USER, password=ADMIN_PASSWORD)
    )
    try:
        admin_user.send("no-acl", b"super user").get(timeout=DEADLINE_S)
    finally:
        admin_user.close()


def test_acls_are_removed_after_the_test(
    kafka_cluster: ApacheKafka, kafka_topic_factory: TopicFactory, kafka_admin: Any
) -> None:
    topic = kafka_topic_factory("acl-cleanup")
    helper = AclHelper(kafka_admin)
    helper.deny_topic(topic)
    helper.cleanup()

    producer = KafkaProducer(**kafka_cluster.kafka_python_config("SASL_SSL"))
    try:
        producer.send(topic, b"open again").get(timeout=DEADLINE_S)
    finally:
        producer.close()


@pytest.mark.parametrize("transport", ["kafka-python", "confluent"])
def test_any_broker_hands_out_settings_and_topics(any_broker: BrokerTarget, transport: str) -> None:
    topic = any_broker.topic("any", partitions=2)
    settings = any_broker.settings(output_topic="out")

    assert settings.bootstrap_servers == [any_broker.bootstrap]
    assert settings.transport == transport
    assert settings.output_topic == "out"
    # Tansu's high-watermark work-around (one record per librdkafka batch) is for Tansu only.
    tansu_fix = settings.producer_properties.get("batch.num.messages") == 1
    assert tansu_fix == (any_broker.kind == TANSU and transport == "confluent")

    produce(any_broker.bootstrap, topic, [(b"k", b"v1"), (b"k", b"v2")])
    assert sorted(r.value for r in read_all(any_broker.bootstrap, topic, 2)) == [b"v1", b"v2"]

    if any_broker.kind == APACHE_KAFKA:
        assert any_broker.kafka is not None
        secured = any_broker.settings("SSL")
        assert secured.security_protocol == "SSL"
        assert secured.ssl_certfile == any_broker.kafka.tls.client_cert
        assert secured.bootstrap_servers == [any_broker.kafka.ssl]
