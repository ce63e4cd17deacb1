"""The operations HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and ``POST /retrain``.

A stdlib threaded server on ``settings.metrics.host:port``, separate from the hot path: it
only reads the :class:`~stream_classifier.ops.health.HealthState` and the metrics registry,
and hands ``POST /retrain`` to a callback.

Invariants:
- ``POST /retrain`` is accepted from loopback clients, or from anyone presenting the
  configured bearer token (``retrain.api_token``); without a token it is loopback-only.
  Answers: 202 accepted, 409 a run is already pending, 401 missing/wrong token, 403
  non-loopback without a configured token, 404 when this process does not retrain.
- Nothing secret is rendered: the exposition holds only metric samples, request logs
  hold method, path (query string dropped) and status, never headers.
- The GPU-memory gauge is refreshed on every scrape; it reads 0 unless this process has
  initialised CUDA through torch.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from stream_classifier.config import MetricsSettings
from stream_classifier.errors import ConfigError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics

logger = logging.getLogger(__name__)

# Schedules one retraining run; returns False when one is already pending or running.
RetrainTrigger = Callable[[], bool]

_MAX_BODY = 65_536


def gpu_memory_allocated_bytes() -> int:
    """Bytes torch has allocated on every CUDA device of this process (0 on CPU).

    Never imports torch nor initialises CUDA: a process that has not done so itself has
    allocated nothing.
    """
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return sum(int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count()))


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        health: HealthState,
        retrain_trigger: RetrainTrigger | None,
        retrain_token: SecretStr | None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics = metrics
        self.health = health
        self.retrain_trigger = retrain_trigger
        self.retrain_token = retrain_token
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "stream-classifier"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path in ("/healthz", "/readyz"):
            snapshot = self.server.health.snapshot()
            ok = snapshot.live if path == "/healthz" else snapshot.ready
            self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, snapshot.as_dict())
        elif path == "/retrain":
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /retrain"})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(min(length, _MAX_BODY))
        if self.path.split("?", 1)[0] != "/retrain":
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        trigger = self.server.retrain_trigger
        if trigger is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "retraining is not enabled in this process"})
            return
        if not self._retrain_authorised():
            return
        try:
            accepted = trigger()
        except Exception as exc:
            log_event(logger, "retrain_trigger_failed", logging.ERROR, error=str(exc))
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "could not schedule a retraining run"})
            return
        if accepted:
            log_event(logger, "retrain_requested", client=self.client_address[0])
            self._json(HTTPStatus.ACCEPTED, {"status": "accepted"})
        else:
            self._json(HTTPStatus.CONFLICT, {"status": "a retraining run is already pending"})

    def _retrain_authorised(self) -> bool:
        """True when the client may trigger retraining; otherwise answers the refusal."""
        if _is_loopback(self.client_address[0]):
            return True
        token = self.server.retrain_token
        if token is None:
            error = "POST /retrain is loopback-only; set retrain.api_token to allow remote calls"
            self._json(HTTPStatus.FORBIDDEN, {"error": error})
            return False
        presented = self.headers.get("Authorization", "").encode()
        if hmac.compare_digest(presented, b"Bearer " + token.get_secret_value().encode()):
            return True
        error = "missing or wrong bearer token"
        self._json(HTTPStatus.UNAUTHORIZED, {"error": error}, {"WWW-Authenticate": "Bearer"})
        return False

    def _metrics(self) -> None:
        metrics = self.server.metrics
        metrics.gpu_memory_allocated.set(gpu_memory_allocated_bytes())
        body = generate_latest(metrics.registry)
        self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)

    def _json(
        self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self._send(status, body, "application/json", headers)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log_event(
            logger,
            "ops_http_request",
            logging.DEBUG,
            method=self.command,
            path=self.path.split("?", 1)[0],
            status=int(code) if str(code).isdigit() else code,
        )

    def log_message(self, format: str, *args: Any) -> None:
        log_event(logger, "ops_http_error", logging.DEBUG, detail=format % args)


class OpsServer:
    """A running ops server; :meth:`stop` shuts it down and frees the port."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ops-http", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_ops_server(
    settings: MetricsSettings,
    metrics: Metrics,
    health: HealthState,
    retrain_trigger: RetrainTrigger | None = None,
    *,
    retrain_token: SecretStr | None = None,
) -> OpsServer:
    """Serve the ops endpoints on ``settings.host:settings.port`` (port 0: any free port)."""
    try:
        server = _Server((settings.host, settings.port), metrics, health, retrain_trigger, retrain_token)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port} for /metrics: {exc.strerror}; "
            "choose another address with STREAM_CLASSIFIER_METRICS__HOST / STREAM_CLASSIFIER_METRICS__PORT"
        ) from exc
    ops = OpsServer(server)
    log_event(logger, "ops_server_started", host=ops.host, port=ops.port)
    return ops
