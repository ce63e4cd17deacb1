"""How the transports classify what goes wrong, without a broker: refused credentials (seen
through kafka-python's SASL mechanisms, or librdkafka's error callback) are fatal and say
what to check; a topic the ACLs deny is fatal and named; a record refused for good is
RecordRejectedError naming its topic. Against Apache Kafka: tests/integration/test_security_e2e.py."""

from __future__ import annotations

import uuid
from typing import Any

import confluent_kafka as ck
import pytest
from kafka import errors as kerr
from kafka.net import sasl as kafka_sasl

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError, RecordRejectedError, TransportError
from stream_classifier.transport import confluent, kafka_python, kafka_python_auth


def _sasl(user: str, mechanism: str = "SCRAM-SHA-512") -> KafkaSettings:
    return KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism=mechanism, sasl_username=user, sasl_password="pw"
    )


def _exchange(user: str, *, accepted: bool, mechanism: str = "PLAIN") -> None:
    """One SASL exchange through kafka-python's (wrapped) mechanism, as its connection runs it."""
    kafka_python_auth.install()
    mech = kafka_sasl.get_sasl_mechanism(mechanism)(
        host="127.0.0.1", sasl_mechanism=mechanism, sasl_plain_username=user, sasl_plain_password="pw"
    )
    mech.auth_bytes()
    if accepted:
        mech.receive(b"")  # PLAIN: an empty reply is the broker's acceptance


def test_kafka_python_mechanisms_are_wrapped_once_and_still_work() -> None:
    kafka_python_auth.install()
    kafka_python_auth.install()
    plain = kafka_sasl.get_sasl_mechanism("PLAIN")
    assert plain.__name__ == "WatchedSaslMechanismPlain"
    assert plain.__mro__[1].__name__ == "SaslMechanismPlain"  # wrapped once, not twice
    mech = plain(sasl_mechanism="PLAIN", sasl_plain_username="u", sasl_plain_password="p")
    assert mech.auth_bytes() == b"u\0u\0p"
    mech.receive(b"")
    assert mech.is_done() and mech.is_authenticated()


def test_refusals_in_a_row_make_refused_credentials_and_one_acceptance_resets_them() -> None:
    user = f"u-{uuid.uuid4().hex[:6]}"
    settings = _sasl(user, "PLAIN")
    for _ in range(kafka_python_auth.REFUSALS_IN_A_ROW - 1):
        _exchange(user, accepted=False)
    assert not kafka_python_auth.credentials_refused(settings)
    _exchange(user, accepted=False)
    assert kafka_python_auth.credentials_refused(settings)
    _exchange(user, accepted=True)
    assert not kafka_python_auth.credentials_refused(settings)
    assert not kafka_python_auth.credentials_refused(_sasl(f"other-{user}", "PLAIN"))


def test_without_sasl_nothing_reads_as_refused_credentials() -> None:
    assert not kafka_python_auth.credentials_refused(KafkaSettings(security_protocol="SSL"))


def _failing(exc: Exception) -> Any:
    def factory(**_cfg: Any) -> Any:
        raise exc

    return factory


def test_a_kafka_python_client_that_cannot_bootstrap_is_transient_unless_credentials_were_refused() -> None:
    user = f"u-{uuid.uuid4().hex[:6]}"
    settings = _sasl(user, "PLAIN")
    timeout = kerr.KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9093")
    with pytest.raises(BrokerUnavailableError, match="Unable to bootstrap"):
        kafka_python.connect(settings, "connecting the consumer", _failing(timeout), {})
    for _ in range(kafka_python_auth.REFUSALS_IN_A_ROW):
        _exchange(user, accepted=False)
    with pytest.raises(TransportError) as raised:
        kafka_python.connect(settings, "connecting the consumer", _failing(timeout), {})
    message = str(raised.value)
    assert f"refused the SASL credentials (PLAIN as user '{user}')" in message
    assert "kafka.sasl_username, kafka.sasl_password" in message
    assert "pw" not in message.replace("password", "")


def test_a_kafka_python_refusal_of_a_record_names_its_topic_and_reaches_the_callback() -> None:
    # Regression: the refusal check raised TypeError (a tuple | type), so kafka-python's
    # errback died and the delivery was never reported: the serving loop waited forever.
    error = kafka_python._translate_produce(kerr.TopicAuthorizationFailedError({"out"}), "out")
    assert isinstance(error, RecordRejectedError)
    assert "the record for topic 'out' was refused: TopicAuthorizationFailedError" in str(error)
    transient = kafka_python._translate_produce(kerr.KafkaConnectionError(), "out")
    assert isinstance(transient, BrokerUnavailableError)


class _FakeCluster:
    def __init__(self) -> None:
        self.unauthorized_topics = {"in", "elsewhere"}


class _FakeClient:
    def __init__(self) -> None:
        self._cluster = _FakeCluster()


def test_kafka_python_denied_topics_are_read_from_its_metadata() -> None:
    assert kafka_python.unauthorized_topics(_FakeClient(), ["in", "other"]) == ["in"]
    assert kafka_python.unauthorized_topics(object(), ["in"]) == []


def _kafka_error(code: int, reason: str = "") -> ck.KafkaError:
    return ck.KafkaError(code, reason)


@pytest.mark.parametrize(
    ("code", "reason", "count", "hint"),
    [
        (ck.KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials", 1, "sasl_password"),
        (ck.KafkaError._SSL, "SSL handshake failed: certificate verify failed", 3, "ssl_cafile"),
    ],
)
def test_librdkafka_connection_errors_that_reconnecting_cannot_cure_become_fatal(
    code: int, reason: str, count: int, hint: str
) -> None:
    errors = confluent.ClientErrors("consumer")
    errors(_kafka_error(ck.KafkaError._TRANSPORT, "Connection refused"))
    errors(_kafka_error(ck.KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    for _ in range(count - 1):
        errors(_kafka_error(code, reason))
    errors.raise_if_fatal("polling")  # not yet
    errors(_kafka_error(code, reason))
    with pytest.raises(TransportError, match=rf"polling failed: .*{reason}.*{hint}"):
        errors.raise_if_fatal("polling")


def test_an_unreachable_oidc_token_endpoint_is_not_refused_credentials() -> None:
    errors = confluent.ClientErrors("producer")
    for _ in range(5):
        errors(_kafka_error(ck.KafkaError._AUTHENTICATION, "Failed to acquire SASL OAUTHBEARER token: 503"))
    errors.raise_if_fatal("producing")


class _Message:
    def __init__(self, error: ck.KafkaError | None, topic: str | None = "in") -> None:
        self._error, self._topic = error, topic

    def error(self) -> ck.KafkaError | None:
        return self._error

    def topic(self) -> str | None:
        return self._topic


def test_librdkafka_reports_a_denied_topic_once_and_that_is_fatal() -> None:
    denied = _Message(_kafka_error(ck.KafkaError.TOPIC_AUTHORIZATION_FAILED, "Topic authorization failed"))
    with pytest.raises(TransportError, match=r"denies topic\(s\) \['in'\] to this client.*SASL user 'svc'"):
        confluent.records_of([denied], "polling", _sasl("svc"), ["in"])
    missing = _Message(_kafka_error(ck.KafkaError.UNKNOWN_TOPIC_OR_PART, "Subscribed topic not available"))
    assert confluent.records_of([missing], "polling", _sasl("svc"), ["in"]) == []


def test_a_librdkafka_refusal_of_a_record_names_its_topic() -> None:
    refused = confluent._translate_produce(_kafka_error(ck.KafkaError.TOPIC_AUTHORIZATION_FAILED), "out")
    assert isinstance(refused, RecordRejectedError)
    assert "the record for topic 'out' was refused: TOPIC_AUTHORIZATION_FAILED" in str(refused)
