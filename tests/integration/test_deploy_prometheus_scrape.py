"""A real Prometheus server (Debian's ``prometheus`` package) scrapes the ops server and
evaluates deploy/prometheus/alerts.yml against it.

This is the scripted form of "point Prometheus at the service": one scrape must succeed
(``up == 1``), stream_classifier_ series must be queryable with their preset label values,
every alert rule must evaluate without error, and the not-ready instance must put
StreamClassifierModelNotReady into pending.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_classifier.ops.metrics import DEAD_LETTER_REASONS
from tests.fixtures.deploy import serving_ops_server

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    if PROMETHEUS is None:
        pytest.skip("prometheus server not installed (apt-get install prometheus; see .ci/setup-tests)")
    with serving_ops_server() as ops:
        web_port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "stream-classifier", "static_configs": [{"targets": [f"127.0.0.1:{ops.port}"]}]}
            ],
        }
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("w")
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{web_port}", ops.port
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        payload = json.load(response)
    assert payload["status"] == "success"
    return payload["data"]


def test_prometheus_scrapes_the_service_and_evaluates_the_alerts(prometheus: tuple[str, int]) -> None:
    base, ops_port = prometheus

    def up() -> list[Any]:
        result: list[Any] = api(base, "query", query='up{job="stream-classifier"} == 1')["result"]
        return result

    [target] = wait_for(up, "a successful scrape")
    assert target["metric"]["instance"] == f"127.0.0.1:{ops_port}"

    reasons = api(base, "query", query="stream_classifier_dead_letters_total")["result"]
    assert {series["metric"]["reason"] for series in reasons} == set(DEAD_LETTER_REASONS)
    [ready] = api(base, "query", query="stream_classifier_ready")["result"]
    assert ready["value"][1] == "0"  # the fixture's service has not loaded a model

    def evaluated_rules() -> list[Any] | None:
        rules = [rule for group in api(base, "rules")["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

    rules = wait_for(evaluated_rules, "every alert rule to evaluate")
    assert len(rules) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"])

    def not_ready_alert() -> list[Any]:
        return [
            a
            for a in api(base, "alerts")["alerts"]
            if a["labels"]["alertname"] == "StreamClassifierModelNotReady"
        ]

    [alert] = wait_for(not_ready_alert, "StreamClassifierModelNotReady to be pending")
    assert alert["state"] == "pending"
