"""Security end to end on Apache Kafka (issue 13, section 4), with both transports.

Over SASL_SSL with SCRAM-SHA-512 and over mutual TLS:

- ``serve`` as a process classifies, and its learning side (the trainer role) rebuilds the
  feedback and follows the model-updates topic through the secured listener;
- ``demo --bootstrap-servers`` runs through (its own clients and the service's);
- the learning side's readers (feedback, model updates, a trusted-eval topic) read there.

And what must fail, fails for good and says why: a wrong password ends ``serve`` with a
non-zero exit naming the credentials; a topic the ACLs deny stops the service (input), is
dead-lettered around (output) or stops it (dead-letter topic too), and fails the readers,
each naming the topic.

One broker for the session (``kafka_cluster``); the test's own clients use its PLAINTEXT
listener (a super user), the code under test the secured ones. Time is spent on processes
(the model load), so the process tests are the 4 listener x transport pairs for ``serve``
and 2 diagonal pairs for the demo (its own clients are kafka-python whatever the transport).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_classifier.app import App
from stream_classifier.config import KafkaSettings, Settings
from stream_classifier.errors import TransportError
from stream_classifier.learn.feedback import FeedbackReader
from stream_classifier.learn.retrainer import load_trusted_eval
from stream_classifier.learn.updates import UpdatesFollower
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from stream_classifier.transport import make_reader, make_transport
from tests.fakes.learning import CountingSwapper, ManifestStore
from tests.fixtures.broker import TEST_HEARTBEAT_MS, TEST_SESSION_TIMEOUT_MS, TRANSPORTS, produce, read_all
from tests.fixtures.kafka_broker import (
    SCRAM_PRINCIPAL,
    SSL_PRINCIPAL,
    AclHelper,
    ApacheKafka,
    Listener,
    TopicFactory,
)
from tests.integration.service_support import service_settings, start_serve, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

SECURED: list[Listener] = ["SASL_SSL", "SSL"]
PRINCIPAL = {"SASL_SSL": SCRAM_PRINCIPAL, "SSL": SSL_PRINCIPAL}
REPO = Path(__file__).parents[2]
FEEDBACK = [
    ("I was charged twice", "billing"),
    ("my parcel is late", "shipping"),
    ("the app crashes", "tech"),
]


def _yaml_safe(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in fields.items()}


def _settings(cluster: ApacheKafka, listener: Listener, transport: str, **overrides: Any) -> KafkaSettings:
    values: dict[str, Any] = {
        **cluster.settings_fields(listener),
        "transport": transport,
        "group_id": f"g-{uuid.uuid4().hex[:10]}",
        "session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": TEST_HEARTBEAT_MS,
    }
    values.update(overrides)
    return KafkaSettings(**values)


def _password(kafka: KafkaSettings) -> dict[str, str]:
    return {"sasl_password": kafka.sasl_password.get_secret_value()} if kafka.sasl_password else {}


def _message(i: int) -> bytes:
    return json.dumps({"id": f"m{i}", "text": f"my parcel number {i} has not arrived"}).encode()


def _feedback_values() -> list[tuple[bytes | None, bytes | None]]:
    return [(None, json.dumps({"text": text, "label": label}).encode()) for text, label in FEEDBACK]


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _header(record: Any, name: str) -> str:
    return (dict(record.headers or []).get(name) or b"").decode()


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path) -> ModelRuntime:
    return ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")


# --------------------------------------------------------------------------- serve, demo


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("listener", SECURED)
def test_serve_classifies_and_learns_over_a_secured_listener(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: TopicFactory,
    *,
    tiny_model_dir: Path,
    tmp_path: Path,
    listener: Listener,
    transport: str,
) -> None:
    source, out, dlq, fb, upd = (kafka_topic_factory(p) for p in ("in", "out", "dlq", "fb", "upd"))
    produce(kafka_cluster.plaintext, fb, _feedback_values())
    n = 12
    produce(kafka_cluster.plaintext, source, [(None, _message(i)) for i in range(n)])
    kafka = _settings(kafka_cluster, listener, transport)
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    **_yaml_safe(kafka.model_dump(exclude_defaults=True, exclude={"sasl_password"})),
                    **(
                        {"sasl_password": kafka.sasl_password.get_secret_value()}
                        if kafka.sasl_password
                        else {}
                    ),
                    "input_topics": source,
                    "output_topic": out,
                    "dead_letter_topic": dlq,
                },
                "model": {"path": str(tiny_model_dir), "device": "cpu", "precision": "fp32"},
                "batching": {"max_batch_size": 8, "max_wait_ms": 10},
                "processing": {"shutdown_timeout_s": 20},
                "metrics": {"port": 0},
                "feedback": {"topics": [fb]},
                "retrain": {
                    "enabled": True,
                    "model_store": str(tmp_path / "store"),
                    "updates_topic": upd,
                    "interval_s": 3600,
                    "min_new_examples": 1000,
                    "manifest_poll_s": 3600,
                },
            }
        )
    )
    log = tmp_path / "serve.log"
    process = start_serve(config, log)
    try:
        outputs = read_all(kafka_cluster.plaintext, out, n, timeout_s=120)
        assert sorted(json.loads(r.value)["id"] for r in outputs) == sorted(f"m{i}" for i in range(n))
        wait_until(
            lambda: any(e["event"] == "feedback_rebuilt" for e in _events(log)), 60, "the feedback rebuilt"
        )
        process.terminate()
        assert process.wait(timeout=40) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    events = _events(log)
    rebuilt = next(e for e in events if e["event"] == "feedback_rebuilt")
    assert rebuilt["examples"] == len(FEEDBACK)
    assert any(e["event"] == "learning_started" and e["trainer"] for e in events)
    failures = {"feedback_reader_failed", "feedback_read_retry", "model_updates_unavailable"}
    assert not [e for e in events if e["event"] in failures], log.read_text()[-3000:]
    assert read_all(kafka_cluster.plaintext, dlq, 1, timeout_s=1) == []


def _demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    return dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize(("listener", "transport"), [("SASL_SSL", "confluent"), ("SSL", "kafka-python")])
def test_demo_runs_against_a_secured_cluster(
    kafka_cluster: ApacheKafka, tiny_model_dir: Path, tmp_path: Path, listener: Listener, transport: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    config = tmp_path / "demo.yaml"
    kafka = {
        **_yaml_safe(kafka_cluster.settings_fields(listener)),
        "transport": transport,
        "input_topics": f"demo-in-{suffix}",
        "output_topic": f"demo-out-{suffix}",
        "dead_letter_topic": f"demo-dlq-{suffix}",
    }
    kafka.pop("bootstrap_servers")
    config.write_text(yaml.safe_dump({"kafka": kafka, "model": {"device": "cpu", "precision": "fp32"}}))
    command = [sys.executable, "-m", "stream_classifier", "demo", "--bootstrap-servers"]
    command += [kafka_cluster.bootstrap(listener), "--model", str(tiny_model_dir), "--messages", "10"]
    command += ["--config", str(config)]
    result = subprocess.run(
        command, cwd=REPO, env=_demo_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"{kafka_cluster.bootstrap(listener)} (given with --bootstrap-servers)" in result.stdout
    assert "result    10/10 classified" in result.stdout
    assert "dead letters 5:" in result.stdout
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the learning side's readers


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("listener", SECURED)
def test_the_learning_side_reads_feedback_trusted_eval_and_updates_over_a_secured_listener(
    kafka_cluster: ApacheKafka, kafka_topic_factory: TopicFactory, listener: Listener, transport: str
) -> None:
    fb, trusted, upd, dlq = (kafka_topic_factory(p) for p in ("fb", "trusted", "upd", "dlq"))
    produce(kafka_cluster.plaintext, fb, _feedback_values())
    produce(kafka_cluster.plaintext, trusted, _feedback_values()[:2])
    kafka = _settings(kafka_cluster, listener, transport, dead_letter_topic=dlq)
    settings = Settings(
        kafka=kafka,
        feedback={"topics": [fb]},
        retrain={"trusted_eval": f"topic:{trusted}", "updates_topic": upd, "manifest_poll_s": 3600},
    )

    # The trusted evaluation set, read to its end.
    assert [(e.text, e.label) for e in load_trusted_eval(settings)] == FEEDBACK[:2]

    # The feedback, rebuilt by the trainer's reader.
    producer = make_transport(kafka).producer()
    reader = FeedbackReader(
        settings, producer, Metrics(CollectorRegistry()), model_labels=["billing", "shipping", "tech"]
    )
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    try:
        assert reader.caught_up.wait(60), f"the feedback reader never caught up: {reader.error!r}"
        snapshot, offsets, fresh = reader.snapshot()
        assert sorted((e.text, e.label) for e in snapshot.train + snapshot.holdout) == sorted(FEEDBACK)
        assert offsets == {f"{fb}:0": len(FEEDBACK)} and fresh == len(FEEDBACK)
    finally:
        reader.stop()
        thread.join(15)

    # Model updates: an announcement, produced over the listener, makes the follower look again.
    swapper = CountingSwapper()
    follower = UpdatesFollower(settings, ManifestStore(), swapper)  # type: ignore[arg-type]
    following = threading.Thread(target=follower.run, daemon=True)
    following.start()
    try:
        wait_until(lambda: swapper.checks >= 1, 30, "the follower's first look at the manifest")
        time.sleep(1.0)  # the reader opens at the topic's end: let it get there first
        delivered: list[BaseException | None] = []
        producer.send(upd, b'{"version": "v1"}', key=b"current", headers=(), on_delivery=delivered.append)
        assert producer.flush(15) and delivered == [None]
        wait_until(lambda: swapper.checks >= 2, 30, "the follower to read the announcement")
    finally:
        follower.stop()
        following.join(15)
        producer.close(5)


# --------------------------------------------------------------------------- what fails for good


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrong_password_ends_serve_with_the_cause_and_no_retry_loop(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: TopicFactory,
    tiny_model_dir: Path,
    tmp_path: Path,
    transport: str,
) -> None:
    fields = _yaml_safe(kafka_cluster.settings_fields("SASL_SSL", password="not-the-password"))
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {
                    **fields,
                    "transport": transport,
                    "input_topics": kafka_topic_factory("in"),
                    "output_topic": kafka_topic_factory("out"),
                    "dead_letter_topic": kafka_topic_factory("dlq"),
                },
                "model": {"path": str(tiny_model_dir), "device": "cpu", "precision": "fp32"},
                "metrics": {"port": 0},
            }
        )
    )
    log = tmp_path / "serve.log"
    started = time.monotonic()
    process = start_serve(config, log)
    try:
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert code != 0, output[-3000:]
    assert time.monotonic() - started < 90
    (error,) = [line for line in output.splitlines() if line.startswith("stream-classifier serve: error:")]
    assert "kafka.sasl_password" in error and "SCRAM-SHA-512" in error, error
    assert "not-the-password" not in output


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrong_password_fails_the_readers_for_good(
    kafka_cluster: ApacheKafka, kafka_topic_factory: TopicFactory, transport: str
) -> None:
    topic = kafka_topic_factory("fb")
    kafka = _settings(kafka_cluster, "SASL_SSL", transport, sasl_password="not-the-password")
    with pytest.raises(TransportError, match=r"kafka\.sasl_password"):
        make_reader(kafka, [topic], start="beginning", wait_for_topics_s=5)


def _run_app(settings: Settings, runtime: ModelRuntime) -> tuple[App, threading.Thread, list[BaseException]]:
    app = App(settings, runtime=runtime, metrics=Metrics(CollectorRegistry()), ops=False, learning=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            app.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return app, thread, errors


@pytest.fixture
def stopped_apps() -> Iterator[list[tuple[App, threading.Thread]]]:
    apps: list[tuple[App, threading.Thread]] = []
    yield apps
    for app, thread in apps:
        app.stop()
        thread.join(60)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_denied_input_topic_stops_the_service_naming_it(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: TopicFactory,
    kafka_acls: AclHelper,
    *,
    runtime: ModelRuntime,
    stopped_apps: list[tuple[App, threading.Thread]],
    transport: str,
) -> None:
    source, out, dlq = (kafka_topic_factory(p) for p in ("in", "out", "dlq"))
    kafka_acls.deny_topic(source, principal=SCRAM_PRINCIPAL)
    kafka = _settings(
        kafka_cluster, "SASL_SSL", transport, input_topics=[source], output_topic=out, dead_letter_topic=dlq
    )
    app, thread, errors = _run_app(service_settings(kafka), runtime)
    stopped_apps.append((app, thread))
    thread.join(60)
    assert not thread.is_alive(), "the service kept running on a topic it may not read"
    assert len(errors) == 1 and isinstance(errors[0], TransportError), errors
    assert source in str(errors[0]) and "TOPIC_AUTHORIZATION_FAILED" in str(errors[0])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_denied_output_is_dead_lettered_and_a_denied_dead_letter_topic_stops_the_service(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: TopicFactory,
    kafka_acls: AclHelper,
    *,
    runtime: ModelRuntime,
    stopped_apps: list[tuple[App, threading.Thread]],
    transport: str,
) -> None:
    source, out, dlq = (kafka_topic_factory(p) for p in ("in", "out", "dlq"))
    kafka_acls.deny_topic(out, principal=SSL_PRINCIPAL)
    kafka = _settings(
        kafka_cluster, "SSL", transport, input_topics=[source], output_topic=out, dead_letter_topic=dlq
    )
    app, thread, errors = _run_app(service_settings(kafka), runtime)
    stopped_apps.append((app, thread))
    produce(kafka_cluster.plaintext, source, [(None, _message(i)) for i in range(3)])

    letters = read_all(kafka_cluster.plaintext, dlq, 3, timeout_s=90)
    assert [_header(r, "error") for r in letters] == ["output_rejected"] * 3, errors
    assert all(repr(out) in _header(r, "error.message") for r in letters), _header(
        letters[0], "error.message"
    )
    assert thread.is_alive() and not errors

    kafka_acls.deny_topic(dlq, principal=SSL_PRINCIPAL)
    time.sleep(1.0)  # let the brokers' authorizer see the new ACL
    produce(kafka_cluster.plaintext, source, [(None, _message(3))])
    thread.join(90)
    assert not thread.is_alive(), "the service went on although neither output nor dead letter can be written"
    assert len(errors) == 1 and isinstance(errors[0], TransportError), errors
    assert f"the dead-letter topic {dlq!r} refuses even a minimal dead letter" in str(errors[0])
    assert read_all(kafka_cluster.plaintext, out, 1, timeout_s=1) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_denied_feedback_topic_is_named_and_fails_for_good(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: TopicFactory,
    kafka_acls: AclHelper,
    transport: str,
) -> None:
    fb, dlq = kafka_topic_factory("fb"), kafka_topic_factory("dlq")
    produce(kafka_cluster.plaintext, fb, _feedback_values())
    kafka_acls.deny_topic(fb, principal=SCRAM_PRINCIPAL)
    kafka = _settings(kafka_cluster, "SASL_SSL", transport, dead_letter_topic=dlq)
    started = time.monotonic()
    with pytest.raises(TransportError, match=rf"denies topic\(s\) \['{fb}'\].*SASL user 'alice'"):
        make_reader(kafka, [fb], start="beginning")
    assert time.monotonic() - started < 15, "a denied topic was waited for like a missing one"

    settings = Settings(kafka=kafka, feedback={"topics": [fb]})
    producer = make_transport(kafka).producer()
    reader = FeedbackReader(settings, producer, Metrics(CollectorRegistry()))
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: reader.error is not None, 30, "the feedback reader's error")
        assert isinstance(reader.error, TransportError) and fb in str(reader.error)
        assert not reader.caught_up.is_set()
        # It stops by itself (serve retried every 30 s for ever), its error kept for retrain requests.
        thread.join(15)
        assert not thread.is_alive(), "the feedback reader went on retrying a denied topic"
        assert isinstance(reader.error, TransportError) and fb in str(reader.error)
    finally:
        reader.stop()
        thread.join(40)
        producer.close(5)
