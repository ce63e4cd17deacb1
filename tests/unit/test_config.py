"""Settings: env names, YAML, validation errors naming the setting, secrets, client config."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from stream_classifier import transport
from stream_classifier.config import load_settings, masked_dump
from stream_classifier.errors import ConfigError
from stream_classifier.ops.logs import configure_logging
from stream_classifier.transport import client_config, kafka_python


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("STREAM_CLASSIFIER_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.kafka.auto_offset_reset == "earliest"
    assert settings.input.format == "json" and settings.input.text_field == "text"
    assert settings.input.id_field == "id"
    assert settings.kafka.transport == "kafka-python"


def test_env_names_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS": "a:9092, b:9092",
        "STREAM_CLASSIFIER_KAFKA__GROUP_ID": "g1",
        "STREAM_CLASSIFIER_KAFKA__INPUT_TOPICS": '["x", "y"]',
        "STREAM_CLASSIFIER_KAFKA__OUTPUT_TOPIC": "out",
        "STREAM_CLASSIFIER_KAFKA__DEAD_LETTER_TOPIC": "dlq",
        "STREAM_CLASSIFIER_KAFKA__AUTO_OFFSET_RESET": "latest",
        "STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD": "hunter2",
        "STREAM_CLASSIFIER_KAFKA__CONSUMER_PROPERTIES": '{"fetch_max_wait_ms": 100}',
        "STREAM_CLASSIFIER_MODEL__PATH": "/models/m",
        "STREAM_CLASSIFIER_MODEL__DEVICE": "cuda:1",
        "STREAM_CLASSIFIER_MODEL__PRECISION": "fp16",
        "STREAM_CLASSIFIER_BATCHING__MAX_BATCH_SIZE": "32",
        "STREAM_CLASSIFIER_BATCHING__MAX_WAIT_MS": "10",
        "STREAM_CLASSIFIER_BATCHING__TOKEN_BUDGET": "4096",
        "STREAM_CLASSIFIER_INPUT__FORMAT": "text",
        "STREAM_CLASSIFIER_INPUT__TEXT_FIELD": "body",
        "STREAM_CLASSIFIER_INPUT__ID_FIELD": "uid",
        "STREAM_CLASSIFIER_INPUT__MAX_BYTES": "1000",
        "STREAM_CLASSIFIER_METRICS__PORT": "9100",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.kafka.bootstrap_servers == ["a:9092", "b:9092"]
    assert s.kafka.input_topics == ["x", "y"]
    assert (s.kafka.group_id, s.kafka.output_topic, s.kafka.dead_letter_topic) == ("g1", "out", "dlq")
    assert s.kafka.auto_offset_reset == "latest"
    assert s.kafka.consumer_properties == {"fetch_max_wait_ms": 100}
    assert (s.model.path, s.model.device, s.model.precision) == ("/models/m", "cuda:1", "fp16")
    assert (s.batching.max_batch_size, s.batching.max_wait_ms, s.batching.token_budget) == (32, 10, 4096)
    assert (s.input.format, s.input.text_field, s.input.id_field, s.input.max_bytes) == (
        "text",
        "body",
        "uid",
        1000,
    )
    assert s.metrics.port == 9100
    dumped = json.dumps(masked_dump(s))
    assert "hunter2" not in dumped and "hunter2" not in repr(s)


def test_yaml_file_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  input_topics: a,b\n  group_id: from-yaml\nbatching:\n  max_batch_size: 8\n")
    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__GROUP_ID", "from-env")
    s = load_settings(path)
    assert s.kafka.input_topics == ["a", "b"]
    assert s.kafka.group_id == "from-env"
    assert s.batching.max_batch_size == 8


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("STREAM_CLASSIFIER_BATCHING__MAX_BATCH_SIZE", "0", "batching.max_batch_size"),
        ("STREAM_CLASSIFIER_KAFKA__AUTO_OFFSET_RESET", "middle", "kafka.auto_offset_reset"),
        ("STREAM_CLASSIFIER_INPUT__FORMAT", "xml", "input.format"),
        ("STREAM_CLASSIFIER_MODEL__DEVICE", "tpu", "model.device"),
        ("STREAM_CLASSIFIER_KAFKA__INPUT_TOPICS", "", "kafka.input_topics"),
    ],
)
def test_errors_name_the_setting(monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as info:
        load_settings()
    assert env in str(info.value)


def test_unknown_yaml_setting_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  bootstrap: x\n")
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap"):
        load_settings(path)


def test_security_settings_reach_the_client_and_the_password_is_never_logged(tmp_path: Path) -> None:
    settings = load_settings(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
            "sasl_password": "hunter2",
            "ssl_cafile": str(tmp_path / "ca.pem"),
            "ssl_certfile": str(tmp_path / "cert.pem"),
            "ssl_keyfile": str(tmp_path / "key.pem"),
            "consumer_properties": {"fetch_max_wait_ms": 50},
            "producer_properties": {"linger_ms": 5},
        }
    )
    consumer = client_config.kafka_python_consumer_config(settings.kafka)
    producer = client_config.kafka_python_producer_config(settings.kafka)
    for cfg in (consumer, producer):
        assert cfg["security_protocol"] == "SASL_SSL" and cfg["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == ("svc", "hunter2")
        assert cfg["ssl_cafile"].endswith("ca.pem") and cfg["ssl_keyfile"].endswith("key.pem")
        assert cfg["ssl_certfile"].endswith("cert.pem")
    assert consumer["fetch_max_wait_ms"] == 50 and producer["linger_ms"] == 5
    assert consumer["enable_auto_commit"] is False and consumer["auto_offset_reset"] == "earliest"

    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    # A fixed api_version makes the client skip its bootstrap probe: nothing listens on port 1.
    offline = settings.kafka.model_copy(
        update={"bootstrap_servers": ["127.0.0.1:1"], "consumer_properties": {"api_version": (2, 5, 0)}}
    )
    try:
        kafka_python.KafkaPythonConsumer(offline).close()
    finally:
        logging.getLogger("stream_classifier").handlers.clear()
    logged = stream.getvalue()
    assert "kafka_consumer_config" in logged and "svc" in logged
    assert "hunter2" not in logged


def test_auto_commit_cannot_be_switched_on() -> None:
    settings = load_settings(kafka={"consumer_properties": {"enable_auto_commit": True}})
    with pytest.raises(ConfigError, match="enable_auto_commit"):
        client_config.kafka_python_consumer_config(settings.kafka)


def test_transport_choice_comes_from_settings() -> None:
    settings = load_settings()
    assert isinstance(transport.make_transport(settings.kafka), kafka_python.KafkaPythonTransport)


def test_decision_and_output_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_CLASSIFIER_DECISION__THRESHOLDS", '{"spam": 0.9}')
    monkeypatch.setenv("STREAM_CLASSIFIER_DECISION__ABSTAIN_LABEL", "unknown")
    monkeypatch.setenv("STREAM_CLASSIFIER_OUTPUT__ROUTES", '{"spam": "quarantine", "unknown": "review"}')
    monkeypatch.setenv("STREAM_CLASSIFIER_OUTPUT__INCLUDE_INPUT", "original")
    monkeypatch.setenv("STREAM_CLASSIFIER_OUTPUT__HEADERS", "all")
    monkeypatch.setenv("STREAM_CLASSIFIER_OUTPUT__TIMESTAMP", "input")
    settings = load_settings()
    assert settings.decision.thresholds == {"spam": 0.9}
    assert settings.decision.abstain_label == "unknown"
    assert settings.output.routes == {"spam": "quarantine", "unknown": "review"}
    assert settings.output.include_input == "original" and settings.output.timestamp == "input"
    assert settings.output.header_mode == "all"
    monkeypatch.setenv("STREAM_CLASSIFIER_OUTPUT__HEADERS", "traceparent, tenant")
    assert load_settings().output.headers == ["traceparent", "tenant"]
    assert load_settings().output.header_mode == "names"


def test_output_defaults_keep_todays_output() -> None:
    settings = load_settings()
    assert settings.decision.abstain_label is None and settings.decision.thresholds == {}
    assert settings.output.routes == {} and settings.output.include_input == "none"
    assert settings.output.header_mode == "none" and settings.output.timestamp == "produced"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"decision": {"thresholds": {"spam": 0.9}}}, "decision.abstain_label"),
        ({"decision": {"target_precision": {"spam": 0.95}}}, "decision.abstain_label"),
        ({"decision": {"thresholds": {"spam": 1.5}, "abstain_label": "unknown"}}, "between 0 and 1"),
        ({"output": {"headers": ["all", "trace"]}}, "stand alone"),
        ({"output": {"routes": {"spam": " "}}}, "empty topic"),
    ],
)
def test_decision_and_output_refusals(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("STREAM_CLASSIFIER_DECISION__THRESHOLD", "STREAM_CLASSIFIER_DECISION__THRESHOLDS"),
        ("STREAM_CLASSIFIER_KAFKA_BOOTSTRAP_SERVERS", "STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS"),
        ("STREAM_CLASSIFIER_OUTPUTS__ROUTES", "STREAM_CLASSIFIER_OUTPUT__ROUTES"),
        ("stream_classifier_output__rout", "STREAM_CLASSIFIER_OUTPUT__ROUTES"),
    ],
)
def test_an_unknown_variable_is_refused_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, closest: str
) -> None:
    monkeypatch.setenv(variable, "x")
    with pytest.raises(ConfigError, match=f"{variable} names no setting; did you mean {closest}"):
        load_settings()


def test_known_variables_pass_the_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("kafka: {group_id: g}\n")
    monkeypatch.setenv("STREAM_CLASSIFIER_CONFIG_FILE", str(config))
    monkeypatch.setenv("STREAM_CLASSIFIER_TEST_ANYTHING", "1")  # the test suite's own namespace
    monkeypatch.setenv("STREAM_CLASSIFIER_LOGGING", '{"level": "DEBUG"}')  # a whole section
    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__CONSUMER_PROPERTIES__FETCH_MIN_BYTES", "1")  # a mapping key
    settings = load_settings()
    assert settings.kafka.group_id == "g" and settings.logging.level == "DEBUG"
