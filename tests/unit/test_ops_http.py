"""The ops HTTP server: endpoints, probe semantics, retrain authorisation, no secrets out."""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from stream_classifier.config import MetricsSettings, load_settings
from stream_classifier.errors import ConfigError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.http import OpsServer, gpu_memory_allocated_bytes, start_ops_server
from stream_classifier.ops.logs import configure_logging
from stream_classifier.ops.metrics import Metrics
from stream_classifier.ops.probe import probe


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(
    server: OpsServer,
    path: str,
    method: str = "GET",
    host: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    url = f"http://{host or '127.0.0.1'}:{server.port}{path}"
    req = urllib.request.Request(
        url, method=method, headers=headers or {}, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def non_loopback_address() -> str | None:
    """An address of this host that is not loopback, so that requests from it are 'remote'."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for UDP connect
            address: str = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def health(metrics: Metrics, clock: Clock) -> HealthState:
    return HealthState(liveness_timeout_s=30.0, ready_gauge=metrics.ready, clock=clock)


@pytest.fixture
def server(metrics: Metrics, health: HealthState) -> Iterator[OpsServer]:
    ops = start_ops_server(MetricsSettings(host="127.0.0.1", port=0), metrics, health)
    yield ops
    ops.stop()


def test_metrics_endpoint_serves_the_registry(server: OpsServer) -> None:
    status, body, headers = request(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert "stream_classifier_ready" in names
    assert "stream_classifier_gpu_memory_allocated_bytes" in names
    assert "process_cpu_seconds" in names


def cuda_initialised() -> bool:
    torch: Any = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def gpu_memory_sample(server: OpsServer) -> float:
    _, body, _ = request(server, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "stream_classifier_gpu_memory_allocated_bytes":
            return float(family.samples[0].value)
    raise AssertionError("stream_classifier_gpu_memory_allocated_bytes is not exposed")


def test_gpu_memory_reads_zero_without_cuda(server: OpsServer) -> None:
    if cuda_initialised():
        pytest.skip("this process has initialised CUDA")
    assert gpu_memory_allocated_bytes() == 0
    assert gpu_memory_sample(server) == 0


@pytest.mark.gpu
def test_gpu_memory_counts_cuda_allocations(server: OpsServer) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert gpu_memory_allocated_bytes() >= block.numel()
    assert gpu_memory_sample(server) >= block.numel()
    del block


def test_healthz_needs_a_recent_loop_tick(server: OpsServer, health: HealthState, clock: Clock) -> None:
    assert request(server, "/healthz")[0] == 503  # loop not started yet: the startupProbe waits
    health.tick()
    status, body, _ = request(server, "/healthz")
    assert status == 200
    assert json.loads(body)["live"] is True
    clock.now += 31.0
    assert request(server, "/healthz")[0] == 503  # stuck loop


def test_healthz_stays_healthy_while_waiting_on_the_broker(
    server: OpsServer, health: HealthState, clock: Clock
) -> None:
    health.tick()
    with health.waiting_on_broker():
        clock.now += 600.0
        assert request(server, "/healthz")[0] == 200
    assert request(server, "/healthz")[0] == 200  # leaving the wait counts as a tick
    clock.now += 31.0
    assert request(server, "/healthz")[0] == 503


def test_readyz_and_ready_gauge_follow_model_consumer_producer(
    server: OpsServer, health: HealthState, metrics: Metrics
) -> None:
    def gauge() -> float:
        return metrics.registry.get_sample_value("stream_classifier_ready") or 0.0

    assert request(server, "/readyz")[0] == 503
    assert gauge() == 0
    health.set_model_loaded(True)
    health.set_consumer_joined(True)
    assert request(server, "/readyz")[0] == 503
    health.set_producer_connected(True)
    status, body, _ = request(server, "/readyz")
    assert status == 200
    assert json.loads(body)["ready"] is True
    assert gauge() == 1
    health.set_consumer_joined(False)  # rebalance / broker gone
    assert request(server, "/readyz")[0] == 503
    assert gauge() == 0


def test_unknown_paths_and_methods(server: OpsServer) -> None:
    assert request(server, "/nope")[0] == 404
    assert request(server, "/retrain")[0] == 405
    assert request(server, "/retrain", method="POST")[0] == 404  # this process does not retrain


@pytest.fixture
def trigger_calls() -> list[int]:
    return []


def make_server(
    metrics: Metrics,
    health: HealthState,
    calls: list[int],
    *,
    token: str | None,
    host: str = "127.0.0.1",
    accept: bool = True,
    **bounds: Any,
) -> OpsServer:
    def trigger() -> bool:
        calls.append(1)
        return accept

    return start_ops_server(
        MetricsSettings(host=host, port=0, **bounds),
        metrics,
        health,
        trigger,
        retrain_token=None if token is None else SecretStr(token),
    )


def test_retrain_from_loopback_is_accepted(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    ops = make_server(metrics, health, trigger_calls, token=None)
    try:
        assert request(ops, "/retrain", method="POST")[0] == 202
        assert trigger_calls == [1]
    finally:
        ops.stop()


def test_retrain_already_pending_is_409(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    ops = make_server(metrics, health, trigger_calls, token=None, accept=False)
    try:
        assert request(ops, "/retrain", method="POST")[0] == 409
    finally:
        ops.stop()


def test_retrain_from_another_host_needs_the_token(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    remote = non_loopback_address()
    if remote is None:
        pytest.skip("this host has no non-loopback IPv4 address to call from")
    no_token = make_server(metrics, health, trigger_calls, token=None, host="0.0.0.0")
    try:
        assert request(no_token, "/retrain", method="POST", host=remote)[0] == 403
    finally:
        no_token.stop()
    with_token = make_server(metrics, health, trigger_calls, token="s3cr3t-token", host="0.0.0.0")
    try:
        status, _, headers = request(with_token, "/retrain", method="POST", host=remote)
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer nope"}
        assert request(with_token, "/retrain", method="POST", host=remote, headers=wrong)[0] == 401
        assert trigger_calls == []
        right = {"Authorization": "Bearer s3cr3t-token"}
        assert request(with_token, "/retrain", method="POST", host=remote, headers=right)[0] == 202
        assert trigger_calls == [1]
    finally:
        with_token.stop()


def test_port_in_use_is_a_config_error(server: OpsServer, metrics: Metrics, health: HealthState) -> None:
    with pytest.raises(ConfigError, match="STREAM_CLASSIFIER_METRICS__PORT"):
        start_ops_server(MetricsSettings(host="127.0.0.1", port=server.port), metrics, health)


def test_probe_reads_the_port_from_settings(
    metrics: Metrics, health: HealthState, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = start_ops_server(MetricsSettings(host="0.0.0.0", port=0), metrics, health)
    monkeypatch.setenv("STREAM_CLASSIFIER_METRICS__PORT", str(ops.port))
    monkeypatch.setenv("STREAM_CLASSIFIER_METRICS__HOST", "0.0.0.0")
    try:
        assert probe("healthz") is False
        health.tick()
        assert probe("healthz") is True
        assert probe("readyz") is False
    finally:
        ops.stop()
    assert probe("healthz") is False


def test_secrets_never_reach_metrics_or_logs(
    metrics: Metrics, health: HealthState, monkeypatch: pytest.MonkeyPatch
) -> None:
    password, token = "pa55-kafka-XYZ", "tok-RETRAIN-987"
    monkeypatch.setenv("STREAM_CLASSIFIER_KAFKA__SASL_PASSWORD", password)
    monkeypatch.setenv("STREAM_CLASSIFIER_RETRAIN__API_TOKEN", token)
    monkeypatch.setenv("STREAM_CLASSIFIER_LOGGING__LEVEL", "DEBUG")
    settings = load_settings()
    logs = io.StringIO()
    configure_logging(settings.logging.level, stream=logs)
    try:
        ops = start_ops_server(
            MetricsSettings(host="127.0.0.1", port=0),
            metrics,
            health,
            lambda: True,
            retrain_token=settings.retrain.api_token,
        )
        try:
            wrong_then_right: list[dict[str, Any]] = [
                {"Authorization": f"Bearer {token}x"},
                {"Authorization": f"Bearer {token}"},
            ]
            for headers in wrong_then_right:
                request(ops, f"/retrain?token={token}", method="POST", headers=headers)
            _, body, _ = request(ops, "/metrics")
            request(ops, "/healthz")
        finally:
            ops.stop()
    finally:
        configure_logging("INFO")
    text = logs.getvalue()
    assert "ops_http_request" in text  # the requests were logged, at DEBUG
    for secret in (password, token):
        assert secret not in text
        assert secret not in body.decode()


def test_log_level_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_CLASSIFIER_LOGGING__LEVEL", "WARNING")
    stream = io.StringIO()
    configure_logging(load_settings().logging.level, stream=stream)
    try:
        log = logging.getLogger("stream_classifier.test")
        log.info("hidden")
        log.warning("shown")
    finally:
        configure_logging("INFO")
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["shown"]
    assert json.loads(lines[0])["level"] == "warning"


# ------------------------------------------------------------------ bounds on hostile clients


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65_536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, data: bytes, *, host: str = "127.0.0.1", timeout_s: float = 3.0) -> int:
    """Send ``data`` as it is; the status of the answer (the server must answer and close)."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(data)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1."), answer
    return int(answer.split(b" ", 2)[1])


def post(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: ops", *headers, "", ""]).encode("latin-1")


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: ops\r\n\r\n"


def test_idle_connections_hold_no_thread_and_a_probe_is_still_answered(
    server: OpsServer, health: HealthState
) -> None:
    health.tick()
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(200)]
    try:
        time.sleep(0.5)  # the server has accepted them all by now
        assert threading.active_count() <= threads
        assert exchange(server.port, GET_HEALTHZ) == 200  # more idle ones than max_connections
        deadline = time.monotonic() + 2.0
        while threading.active_count() > threads and time.monotonic() < deadline:
            time.sleep(0.01)  # its handler thread ends right after closing the connection
        assert threading.active_count() <= threads
    finally:
        for sock in idle:
            sock.close()


def test_a_slowloris_connection_is_closed_at_the_request_deadline(
    metrics: Metrics, health: HealthState
) -> None:
    settings = MetricsSettings(host="127.0.0.1", port=0, request_timeout_s=1.0)
    ops = start_ops_server(settings, metrics, health)
    try:
        with socket.create_connection(("127.0.0.1", ops.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            closed = False
            while not closed and time.monotonic() - started < 4.0:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")  # a header every 0.2 s: never idle for long
                    if select.select([sock], [], [], 0.2)[0]:
                        closed = sock.recv(1024) == b""
                except OSError:  # reset by the server
                    closed = True
            elapsed = time.monotonic() - started
        assert closed
        assert elapsed < 2.5
    finally:
        ops.stop()


def test_requests_beyond_the_handlers_are_answered_503_at_once(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    health.tick()
    ops = make_server(metrics, health, trigger_calls, token=None, max_handlers=2, request_timeout_s=1.5)
    try:
        # Two authorised requests whose announced body never comes hold both handlers.
        held = [socket.create_connection(("127.0.0.1", ops.port), timeout=5) for _ in range(2)]
        for sock in held:
            sock.sendall(post("/retrain", "Content-Length: 10"))
        time.sleep(0.3)
        threads = threading.active_count()
        started = time.monotonic()
        assert exchange(ops.port, GET_HEALTHZ) == 503
        assert time.monotonic() - started < 0.5
        assert threading.active_count() <= threads
        for sock in held:  # given up at the deadline: closed, nothing triggered
            assert read_until_closed(sock) == b""
            sock.close()
        assert exchange(ops.port, GET_HEALTHZ) == 200
        assert trigger_calls == []
    finally:
        ops.stop()


def test_no_body_is_read_for_an_unknown_path(metrics: Metrics, health: HealthState) -> None:
    ops = make_server(metrics, health, [], token=None)
    try:
        # The announced body is never sent: the answer must not wait for it.
        assert exchange(ops.port, post("/nope", "Content-Length: 60000")) == 404
    finally:
        ops.stop()


def test_no_body_is_read_from_an_unauthorised_client(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    remote = non_loopback_address()
    if remote is None:
        pytest.skip("this host has no non-loopback IPv4 address to call from")
    for token, refused in ((None, 403), ("s3cr3t-token", 401)):
        ops = make_server(metrics, health, trigger_calls, token=token, host="0.0.0.0")
        try:
            assert exchange(ops.port, post("/retrain", "Content-Length: 60000"), host=remote) == refused
        finally:
            ops.stop()
    assert trigger_calls == []


def test_an_empty_token_never_authorises(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    remote = non_loopback_address()
    if remote is None:
        pytest.skip("this host has no non-loopback IPv4 address to call from")
    ops = make_server(metrics, health, trigger_calls, token="", host="0.0.0.0")
    try:
        for authorization in ("Authorization: Bearer ", "Authorization: Bearer", "X-None: 1"):
            request_bytes = post("/retrain", authorization, "Content-Length: 0")
            assert exchange(ops.port, request_bytes, host=remote) == 403  # as if no token were set
        assert trigger_calls == []
    finally:
        ops.stop()


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("Content-Length: abc", 400),
        ("Content-Length: -1", 400),
        ("Content-Length: 1.5", 400),
        ("Content-Length: 5, 6", 400),
        ("Content-Length: 5\r\nContent-Length: 6", 400),
        ("Content-Length: ", 400),
        ("Transfer-Encoding: chunked", 411),
    ],
)
def test_a_bad_content_length_is_refused(
    metrics: Metrics, health: HealthState, trigger_calls: list[int], header: str, status: int
) -> None:
    ops = make_server(metrics, health, trigger_calls, token=None)
    try:
        assert exchange(ops.port, post("/retrain", header)) == status
        assert trigger_calls == []
    finally:
        ops.stop()


def test_a_body_over_the_cap_is_refused_unread(
    metrics: Metrics, health: HealthState, trigger_calls: list[int]
) -> None:
    ops = make_server(metrics, health, trigger_calls, token=None)
    try:
        assert exchange(ops.port, post("/retrain", "Content-Length: 10000000")) == 413
        body = b"{}"
        small = post("/retrain", f"Content-Length: {len(body)}") + body
        assert exchange(ops.port, small) == 202  # a small body is read and ignored
        assert trigger_calls == [1]
    finally:
        ops.stop()


# ------------------------------------------------------------------ readiness: the producer


def test_readiness_follows_the_producers_deliveries(
    server: OpsServer, health: HealthState, metrics: Metrics, clock: Clock
) -> None:
    def gauge() -> float:
        return metrics.registry.get_sample_value("stream_classifier_ready") or 0.0

    health.set_model_loaded(True)
    health.set_consumer_joined(True)
    health.set_producer_connected(True)  # the clients were created
    status, body, _ = request(server, "/readyz")
    assert status == 200
    assert json.loads(body)["seconds_since_delivery"] is None  # nothing delivered yet
    health.set_producer_connected(False)  # a delivery failed, the brokers may recover
    status, body, _ = request(server, "/readyz")
    assert status == 503
    assert json.loads(body)["producer_connected"] is False
    assert gauge() == 0
    health.producer_acknowledged()  # acknowledgements arrive again
    clock.now += 2.5
    status, body, _ = request(server, "/readyz")
    assert status == 200
    assert json.loads(body)["seconds_since_delivery"] == 2.5
    assert gauge() == 1
    health.set_producer_connected(False)  # closed for a reconnect
    assert request(server, "/readyz")[0] == 503
    assert gauge() == 0
