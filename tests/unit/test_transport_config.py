"""Client configuration for both transports: security settings, pass-through properties,
secrets, and OAUTHBEARER refused (with the librdkafka OIDC pass-through it points to).

Here at the configuration level; SASL/SCRAM and mutual TLS run end to end against Apache
Kafka in tests/integration/test_security_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import confluent_kafka as ck
import pytest
from kafka import KafkaConsumer, KafkaProducer

from stream_classifier import transport
from stream_classifier.config import KafkaSettings
from stream_classifier.errors import ConfigError
from stream_classifier.transport import client_config, confluent, kafka_python

SECURE = {
    "bootstrap_servers": ["broker-1:9093", "broker-2:9093"],
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "svc-classifier",
    "sasl_password": "pa55word",
    "ssl_cafile": Path("/etc/kafka/ca.pem"),
    "ssl_certfile": Path("/etc/kafka/client.pem"),
    "ssl_keyfile": Path("/etc/kafka/client.key"),
}


def test_kafka_python_gets_every_security_setting_under_its_own_names() -> None:
    settings = KafkaSettings(**SECURE)
    cfg = client_config.kafka_python_producer_config(settings)
    assert cfg["bootstrap_servers"] == ["broker-1:9093", "broker-2:9093"]
    assert cfg["security_protocol"] == "SASL_SSL" and cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("svc-classifier", "pa55word")
    assert (cfg["ssl_cafile"], cfg["ssl_certfile"], cfg["ssl_keyfile"]) == (
        "/etc/kafka/ca.pem",
        "/etc/kafka/client.pem",
        "/etc/kafka/client.key",
    )
    assert set(cfg) <= set(KafkaProducer.DEFAULT_CONFIG)
    consumer_cfg = client_config.kafka_python_consumer_config(settings, read_committed=True)
    assert consumer_cfg["isolation_level"] == "read_committed"
    assert set(consumer_cfg) <= set(KafkaConsumer.DEFAULT_CONFIG)


def test_librdkafka_gets_every_security_setting_under_its_names_and_accepts_them() -> None:
    settings = KafkaSettings(**SECURE)
    cfg = client_config.confluent_producer_config(settings, transactional_id="tx-1")
    assert cfg["bootstrap.servers"] == "broker-1:9093,broker-2:9093"
    assert cfg["security.protocol"] == "sasl_ssl" and cfg["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (cfg["sasl.username"], cfg["sasl.password"]) == ("svc-classifier", "pa55word")
    assert (cfg["ssl.ca.location"], cfg["ssl.certificate.location"], cfg["ssl.key.location"]) == (
        "/etc/kafka/ca.pem",
        "/etc/kafka/client.pem",
        "/etc/kafka/client.key",
    )
    assert cfg["transactional.id"] == "tx-1" and cfg["enable.idempotence"] is True
    # librdkafka validates every property name and value when the client is created.
    plain = client_config.confluent_producer_config(
        KafkaSettings(**{**SECURE, "security_protocol": "SASL_PLAINTEXT"})
    )
    ck.Producer(plain)
    consumer_cfg = client_config.confluent_consumer_config(settings, read_committed=True)
    assert consumer_cfg["isolation.level"] == "read_committed"
    assert consumer_cfg["enable.auto.commit"] is False


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (client_config.kafka_python_producer_config, "sasl_plain_password"),
        (client_config.confluent_producer_config, "sasl.password"),
    ],
)
def test_the_secret_is_masked_in_the_loggable_view(build, name: str) -> None:
    described = client_config.describe_client_config(build(KafkaSettings(**SECURE)))
    assert described[name] == "**********"
    assert "pa55word" not in repr(described)


def test_pass_through_properties_reach_the_client_but_cannot_enable_auto_commit() -> None:
    settings = KafkaSettings(
        producer_properties={"linger.ms": 20, "compression.type": "lz4"},
        consumer_properties={"fetch.min.bytes": 1024},
    )
    assert client_config.confluent_producer_config(settings)["linger.ms"] == 20
    assert client_config.confluent_consumer_config(settings)["fetch.min.bytes"] == 1024
    auto_commit = KafkaSettings(consumer_properties={"enable.auto.commit": True})
    with pytest.raises(ConfigError, match=r"enable\.auto\.commit"):
        client_config.confluent_consumer_config(auto_commit)


def test_the_transport_setting_picks_the_client() -> None:
    assert isinstance(transport.make_transport(KafkaSettings()), kafka_python.KafkaPythonTransport)
    assert isinstance(
        transport.make_transport(KafkaSettings(transport="confluent")), confluent.ConfluentTransport
    )


def test_kafka_python_checksums_in_c_with_the_fast_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # The dev install includes [fast], which brings the crc32c package kafka-python looks for.
    assert kafka_python.crc32c_implementation() == "c"
    monkeypatch.setattr(kafka_python.kafka_record_util, "crc32c_c", None)  # as without the package
    assert kafka_python.crc32c_implementation() == "python"


PASS_THROUGH_SECRETS = {
    "sasl.oauthbearer.client.secret": "oauth-secret-1",
    "ssl.key.pem": "-----BEGIN PRIVATE KEY-----pem-secret-2",
    "ssl.keystore.password": "keystore-secret-3",
    "sasl.jaas.config": "org.apache...ScramLoginModule required password=jaas-secret-4;",
    "ssl_password": "key-secret-5",
}


@pytest.mark.parametrize(
    "build", [client_config.kafka_python_producer_config, client_config.confluent_producer_config]
)
def test_pass_through_secrets_are_masked_in_logs_and_in_config(build) -> None:
    from stream_classifier.config import Settings, masked_dump

    settings = KafkaSettings(
        producer_properties=PASS_THROUGH_SECRETS, consumer_properties=PASS_THROUGH_SECRETS
    )
    shown = repr(client_config.describe_client_config(build(settings))) + repr(
        masked_dump(Settings(kafka=settings))
    )
    for secret in PASS_THROUGH_SECRETS.values():
        assert secret not in shown
    assert shown.count(client_config.MASK) >= 2 * len(PASS_THROUGH_SECRETS)
    assert client_config.describe_client_config({"ssl.key.location": "/k.pem.path"}) == {
        "ssl.key.location": "/k.pem.path"
    }


def test_oauthbearer_is_refused_with_what_to_use_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_classifier.config import load_settings

    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__SASL_MECHANISM", "OAUTHBEARER")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "setting 'kafka.sasl_mechanism'" in message
    assert "Use SCRAM-SHA-512" in message
    assert "sasl.oauthbearer.method: oidc" in message and "kafka.consumer_properties" in message


OIDC = {
    "sasl.mechanism": "OAUTHBEARER",
    "sasl.oauthbearer.method": "oidc",
    "sasl.oauthbearer.client.id": "classifier",
    "sasl.oauthbearer.client.secret": "oidc-secret",
    "sasl.oauthbearer.token.endpoint.url": "https://127.0.0.1:1/oauth2/token",
}


def test_librdkafka_oidc_passes_through_to_every_client_the_transport_makes() -> None:
    """The way the refusal points to: librdkafka accepts the properties (it validates them
    when a client is made) for the consumer, the producer and the learning side's readers;
    the secret stays masked. Getting a token needs an identity provider, not run here."""
    settings = KafkaSettings(
        transport="confluent",
        security_protocol="SASL_SSL",
        bootstrap_servers=["127.0.0.1:1"],
        consumer_properties=OIDC,
        producer_properties=OIDC,
    )
    consumer = client_config.confluent_consumer_config(settings)
    reader = client_config.confluent_reader_config(settings)
    producer = client_config.confluent_producer_config(settings)
    for cfg in (consumer, reader, producer):
        assert cfg["sasl.mechanism"] == "OAUTHBEARER" and cfg["security.protocol"] == "sasl_ssl"
        assert "oidc-secret" not in repr(client_config.describe_client_config(cfg))
    ck.Consumer(consumer).close()
    ck.Consumer(reader).close()
    ck.Producer(producer).flush(0)


@pytest.mark.parametrize("setting", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_tls_file_that_cannot_be_read_is_fatal_and_named(tmp_path: Path, setting: str, client: str) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    missing = tmp_path / "gone" / "client.pem"
    settings = KafkaSettings(security_protocol="SSL", transport=client, **{**files, setting: missing})
    for make in (
        lambda: transport.make_transport(settings),
        lambda: transport.make_reader(settings, ["fb"], start="beginning"),
    ):
        with pytest.raises(ConfigError, match=rf"'kafka\.{setting}' names '{missing}', which does not exist"):
            make()
    directory = KafkaSettings(security_protocol="SASL_SSL", **{setting: tmp_path})
    with pytest.raises(ConfigError, match="is not a file"):
        transport.make_transport(directory)
    # Files that are there pass; PLAINTEXT ignores the TLS settings.
    transport.make_transport(KafkaSettings(security_protocol="SSL", transport=client, **files))
    transport.make_transport(KafkaSettings(**{setting: missing}))
