"""Prometheus rules and the Grafana dashboard against the live exposition of the ops server.

promtool (Debian's ``prometheus`` package, installed by .ci/setup-tests) checks the rule
syntax, runs the rule unit tests and lints a live scrape; without it those checks skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.deploy import scrape, serving_ops_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts-test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-classifier.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; see .ci/setup-tests)"
)

_METRIC = re.compile(r"\b((?:stream_classifier|process)_[a-zA-Z0-9_]*)(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "info": ("_info",),
}


@pytest.fixture(scope="module")
def exposition() -> Iterator[str]:
    with serving_ops_server() as server:
        yield scrape(server)


def exposed_series(text: str) -> dict[str, list[dict[str, str]]]:
    """Every series name the exposition defines (with the label sets of its samples)."""
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, [])
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [var["definition"] for var in dashboard["templating"]["list"]]
    return exprs


def unknown_references(exprs: list[str], series: dict[str, list[dict[str, str]]]) -> list[str]:
    """Metric names, and ``label="value"`` matchers, that no series of the exposition has."""
    problems = []
    for expr in exprs:
        for name, selector in _METRIC.findall(expr):
            if name not in series:
                problems.append(f"{name} (in {expr!r})")
                continue
            for label, value in _MATCHER.findall(selector or ""):
                if not any(labels.get(label) == value for labels in series[name]):
                    problems.append(f'{name}{{{label}="{value}"}} (in {expr!r})')
    return problems


def test_every_metric_the_alerts_use_is_exposed(exposition: str) -> None:
    exprs = alert_expressions()
    assert exprs
    assert unknown_references(exprs, exposed_series(exposition)) == []


def test_every_metric_the_dashboard_uses_is_exposed(exposition: str) -> None:
    exprs = dashboard_expressions()
    assert exprs
    assert unknown_references(exprs, exposed_series(exposition)) == []


def test_the_reference_check_catches_a_typo(exposition: str) -> None:
    series = exposed_series(exposition)
    assert unknown_references(["rate(stream_classifier_predictionz_total[5m])"], series)
    assert unknown_references(['stream_classifier_retrain_runs_total{outcome="exploded"}'], series)


def test_dashboard_has_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in dashboard["panels"]}
    required = {
        "throughput": "stream_classifier_messages_consumed_total",
        "latency p50": "histogram_quantile(0.5, sum by (le) (rate(stream_classifier_end_to_end_latency",
        "latency p99": "histogram_quantile(0.99, sum by (le) (rate(stream_classifier_end_to_end_latency",
        "batch size": "stream_classifier_batch_size_messages",
        "lag": "stream_classifier_consumer_lag_messages",
        "dead letters per reason": "sum by (reason) (rate(stream_classifier_dead_letters_total",
        "predictions per label": "sum by (label) (rate(stream_classifier_predictions_total",
        "confidence": "stream_classifier_prediction_confidence_bucket",
        "model version": "by (instance, version) (stream_classifier_model_info",
        "retraining outcomes": "sum by (outcome) (increase(stream_classifier_retrain_runs_total",
        "gpu memory": "stream_classifier_gpu_memory_allocated_bytes",
    }
    all_exprs = " ".join(text.values())
    missing = [what for what, fragment in required.items() if fragment not in all_exprs]
    assert missing == []
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasources = {json.dumps(panel["datasource"], sort_keys=True) for panel in dashboard["panels"]}
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources == {json.dumps({"type": "prometheus", "uid": provisioned["datasources"][0]["uid"]})}


def test_alerts_cover_the_required_conditions() -> None:
    rules = {
        rule["alert"]: rule["expr"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert set(rules) == {
        "StreamClassifierLagGrowing",
        "StreamClassifierDeadLetterRatioHigh",
        "StreamClassifierNoPredictions",
        "StreamClassifierLatencyP99High",
        "StreamClassifierRetrainingFailed",
        "StreamClassifierModelNotReady",
        "StreamClassifierRecordsRefused",
        "StreamClassifierRuntimeFailing",
        "StreamClassifierModelUpdateFailed",
    }
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == set(rules), "every alert needs a promtool unit test where it fires"


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_metrics_on_a_live_scrape(exposition: str) -> None:
    result = promtool("check", "metrics", stdin=exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
