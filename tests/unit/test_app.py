"""The composition root on the fakes: one App serves, answers on its ops port, and stops."""

from __future__ import annotations

import http.client
import json

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.app import App
from stream_classifier.ops.metrics import Metrics
from tests.fakes.classifier import StubClassifier
from tests.fakes.harness import IN, OUT, unit_settings, wait_until
from tests.fakes.transport import FakeBroker, FakeTransport

pytestmark = pytest.mark.timeout(60)


def _post_retrain(app: App) -> int:
    assert app.ops is not None
    connection = http.client.HTTPConnection("127.0.0.1", app.ops.port, timeout=5)
    try:
        connection.request("POST", "/retrain", body=b"")
        return connection.getresponse().status
    finally:
        connection.close()


def _app() -> tuple[App, FakeBroker]:
    broker = FakeBroker()
    broker.create_topic(IN, 2)
    settings = unit_settings(metrics={"host": "127.0.0.1", "port": 0})
    metrics = Metrics(CollectorRegistry())
    return App(settings, runtime=StubClassifier(), metrics=metrics, transport=FakeTransport(broker)), broker


def test_the_app_serves_and_stops_gracefully() -> None:
    app, broker = _app()
    for i in range(20):
        broker.produce(IN, json.dumps({"text": f"message {i}", "id": i}).encode(), partition=i % 2)
    with app.running():
        wait_until(lambda: len(broker.records(OUT)) == 20, what="20 outputs")
        assert app.health.snapshot().ready
    assert app.service is not None and app.service.in_flight == 0
    assert sum(broker.committed().values()) == 20


def test_retrain_endpoint_exists_only_in_the_trainer_role() -> None:
    app, _ = _app()
    with app.running():
        app.wait_started(timeout_s=10)
        assert _post_retrain(app) == 404  # a serving replica has no retrainer


def test_stop_before_the_service_exists_still_ends_run() -> None:
    app, _ = _app()
    app.stop()
    with app.running(join_timeout_s=20):
        pass
    assert app.service is not None  # built, then stopped at once: run() returned
