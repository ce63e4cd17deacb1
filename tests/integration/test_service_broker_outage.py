"""No broker at start: the service waits (retrying with backoff, logging the outage exactly
once and its end after it), is not ready meanwhile, and serves once a broker appears on that
address."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from stream_classifier.config import KafkaSettings
from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics, free_loopback_port
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.logs import configure_logging
from tests.fixtures.broker import TEST_HEARTBEAT_MS, TEST_SESSION_TIMEOUT_MS, produce, read_all
from tests.integration.service_support import running_service, service_settings, wait_until

pytestmark = pytest.mark.integration


def test_service_waits_for_a_late_broker(tiny_model_dir: Path) -> None:
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    port = free_loopback_port()
    kafka = KafkaSettings(
        bootstrap_servers=[f"127.0.0.1:{port}"],
        group_id="late",
        input_topics=["late-in"],
        output_topic="late-out",
        dead_letter_topic="late-dlq",
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=TEST_HEARTBEAT_MS,
        consumer_properties={"metadata_max_age_ms": 1_000},
    )
    logs = io.StringIO()
    configure_logging("INFO", logs)
    try:
        with running_service(service_settings(kafka), runtime) as service:
            # The outage is seen (and logged) while the port is still closed.
            wait_until(lambda: '"broker_unavailable"' in logs.getvalue(), 60, "the outage logged")
            snapshot = service.health.snapshot()
            assert not snapshot.ready and not snapshot.producer_connected
            with EmbeddedBroker(port=port) as broker:
                create_topics(broker.bootstrap_servers, ["late-in", "late-out", "late-dlq"])
                produce(broker.bootstrap_servers, "late-in", [(None, b'{"text": "finally", "id": "x"}')])
                outputs = read_all(broker.bootstrap_servers, "late-out", 1, timeout_s=90)
                assert [json.loads(r.value)["id"] for r in outputs] == ["x"]
                assert service.health.snapshot().ready
    finally:
        logging.getLogger("stream_classifier").handlers.clear()
    events = [json.loads(line)["event"] for line in logs.getvalue().splitlines()]
    # Once per change of state, not per retry: one outage, then its end.
    assert events.count("broker_unavailable") == 1, events
    assert "broker_available" in events[events.index("broker_unavailable") :], events
    assert events.count("service_started") == 1
