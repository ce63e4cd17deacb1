"""The operations HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and ``POST /retrain``.

A stdlib server on ``settings.metrics.host:port``, separate from the hot path: it only
reads the :class:`~stream_classifier.ops.health.HealthState` and the metrics registry, and
hands ``POST /retrain`` to a callback.

Bounds, for any client however slow or hostile (the port may be reachable from untrusted
networks; probes must still be answered):
- **Connections, threads and time** are bounded by :mod:`.http_server`, for any client.
- **The body comes last.** ``POST /retrain`` checks the route and the authorisation before
  it reads a byte of body; the body is read only up to ``_MAX_BODY_BYTES`` (413 beyond,
  400 for a Content-Length that is not one decimal number, 411 for a chunked body).

Authorisation of ``POST /retrain``: loopback clients, or anyone presenting the configured
bearer token (``retrain.api_token``, compared in constant time); an unset or blank token
never authorises, so the endpoint is then loopback-only. Answers: 202 accepted, 409 a run
is already pending, 401 missing/wrong token, 403 non-loopback without a usable token, 404
when this process does not retrain.

Nothing secret is rendered: the exposition holds only metric samples, request logs hold
method, path (query string dropped) and status, never headers. The GPU-memory gauge is
refreshed on every scrape; it reads 0 unless this process has initialised CUDA through
torch.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from stream_classifier.config import MetricsSettings
from stream_classifier.errors import ConfigError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.http_server import BoundedHTTPServer, Client, DeadlineStream
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# Schedules one retraining run; returns False when one is already pending or running.
RetrainTrigger = Callable[[], bool]

# POST /retrain takes no body; a client may still send a small one, which is read and ignored.
_MAX_BODY_BYTES = 65_536


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


def _bearer(token: SecretStr | None) -> bytes | None:
    """The ``Authorization`` value that authorises, or None when no token may authorise."""
    if token is None or not token.get_secret_value().strip():
        return None
    return b"Bearer " + token.get_secret_value().encode()


class _Server(BoundedHTTPServer):
    """The ops endpoints' server: what the handlers read, on the bounded connection layer."""

    def __init__(
        self,
        settings: MetricsSettings,
        metrics: Metrics,
        health: HealthState,
        retrain_trigger: RetrainTrigger | None,
        retrain_token: SecretStr | None,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.retrain_trigger = retrain_trigger
        self.retrain_bearer = _bearer(retrain_token)
        super().__init__(
            settings.host,
            settings.port,
            lambda client: _Handler(client, client.address, self),
            request_timeout_s=settings.request_timeout_s,
            max_connections=settings.max_connections,
            max_handlers=settings.max_handlers,
        )


# ------------------------------------------------------------------ endpoints


class _Handler(BaseHTTPRequestHandler):
    """One request of one :class:`Client`, whose head has fully arrived."""

    server: _Server
    server_version = "stream-classifier"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection

    def __init__(self, client: Client, address: Any, server: _Server) -> None:
        self._client = client
        super().__init__(client.sock, address, server)  # handles the request

    def setup(self) -> None:
        self.connection = self._client.sock
        stream = DeadlineStream(self._client)
        self.rfile = io.BufferedReader(stream)
        self.wfile = io.BufferedWriter(stream)

    def do_GET(self) -> None:
        path = self._path()
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
        if self._path() != "/retrain":
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        trigger = self.server.retrain_trigger
        if trigger is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "retraining is not enabled in this process"})
            return
        if not self._retrain_authorised() or not self._read_body():
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

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _retrain_authorised(self) -> bool:
        """True when the client may trigger retraining; otherwise answers the refusal."""
        if _is_loopback(self.client_address[0]):
            return True
        expected = self.server.retrain_bearer
        if expected is None:
            error = "POST /retrain is loopback-only; set retrain.api_token to allow remote calls"
            self._json(HTTPStatus.FORBIDDEN, {"error": error})
            return False
        # Header values arrive decoded as latin-1: encoding back gives the bytes that were sent.
        presented = self.headers.get("Authorization", "").encode("latin-1")
        if hmac.compare_digest(presented, expected):
            return True
        error = "missing or wrong bearer token"
        self._json(HTTPStatus.UNAUTHORIZED, {"error": error}, {"WWW-Authenticate": "Bearer"})
        return False

    def _read_body(self) -> bool:
        """Read (and drop) the announced body; False, after answering any refusal, when the
        request must go no further."""
        if "Transfer-Encoding" in self.headers:
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "send a body with Content-Length"})
            return False
        values = self.headers.get_all("Content-Length") or ["0"]
        text = values[0].strip()
        if len(values) > 1 or not (text.isascii() and text.isdigit()):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "Content-Length must be one decimal number"})
            return False
        length = int(text)
        if length > _MAX_BODY_BYTES:
            error = f"the body may hold at most {_MAX_BODY_BYTES} bytes"
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": error})
            return False
        # Shorter only when the client closed early: there is nobody left to answer.
        return len(self.rfile.read(length)) == length

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
            path=self._path(),
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
        """Close the listener and every connection still sending its request; a request being
        answered finishes on its own (by its deadline at the latest)."""
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
        server = _Server(settings, metrics, health, retrain_trigger, retrain_token)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port} for /metrics: {exc.strerror}; "
            "choose another address with STREAM_CLASSIFIER_METRICS__HOST / STREAM_CLASSIFIER_METRICS__PORT"
        ) from exc
    if retrain_token is not None and server.retrain_bearer is None:
        log_event(
            logger,
            "retrain_token_blank",
            logging.WARNING,
            detail="retrain.api_token is blank: POST /retrain stays loopback-only",
        )
    ops = OpsServer(server)
    log_event(logger, "ops_server_started", host=ops.host, port=ops.port)
    return ops
