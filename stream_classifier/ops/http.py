"""The operations HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and ``POST /retrain``.

A stdlib server on ``settings.metrics.host:port``, separate from the hot path: it only
reads the :class:`~stream_classifier.ops.health.HealthState` and the metrics registry, and
hands ``POST /retrain`` to a callback.

Bounds, for any client however slow or hostile (the port may be reachable from untrusted
networks; probes must still be answered):
- **One deadline per connection.** A connection is closed at the latest
  ``request_timeout_s`` after its accept: every read and write on it ends by then. One
  request per connection (HTTP/1.0), so a request never waits behind another.
- **Idle connections cost no thread.** One server thread accepts connections and reads
  their request heads without blocking, at most ``_MAX_HEAD_BYTES`` each (431 beyond). It
  holds at most ``max_connections`` of them; a new one beyond that closes the oldest, so a
  flood of idle or trickling connections never locks a probe out.
- **Bounded handlers.** A complete request head gets a handler thread; at most
  ``max_handlers`` run at once, and a request beyond that is answered 503 at once.
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

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import selectors
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from stream_classifier.config import MetricsSettings
from stream_classifier.errors import ConfigError
from stream_classifier.ops.health import HealthState
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

logger = logging.getLogger(__name__)

# Schedules one retraining run; returns False when one is already pending or running.
RetrainTrigger = Callable[[], bool]

# Request line and headers together; the endpoints need a few hundred bytes.
_MAX_HEAD_BYTES = 16_384
# POST /retrain takes no body; a client may still send a small one, which is read and ignored.
_MAX_BODY_BYTES = 65_536
_RECV_BYTES = 4_096


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


def _answer(status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.0 response with a JSON body, for answers sent without a handler."""
    body = (json.dumps(payload) + "\n").encode()
    lines = [
        f"HTTP/1.0 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ------------------------------------------------------------------ connections


@dataclass(eq=False)
class _Client:
    """An accepted connection: its socket, peer, deadline and the bytes received so far."""

    sock: socket.socket
    address: Any
    deadline: float
    received: bytearray = field(default_factory=bytearray)


class _DeadlineStream(io.RawIOBase):
    """A client's socket as a raw stream: the bytes already received first, then the
    socket's; every read and write on the socket ends by the client's deadline
    (:class:`TimeoutError` once it has passed)."""

    def __init__(self, client: _Client) -> None:
        super().__init__()
        self._client = client
        self._received = memoryview(bytes(client.received))

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        if self._received:
            count = min(len(target), len(self._received))
            target[:count] = self._received[:count]
            self._received = self._received[count:]
            return count
        self._arm()
        return self._client.sock.recv_into(target)

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        self._arm()
        self._client.sock.sendall(view)
        return view.nbytes

    def _arm(self) -> None:
        remaining = self._client.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the connection's deadline has passed")
        self._client.sock.settimeout(remaining)


def _send_and_close(sock: socket.socket, response: bytes) -> None:
    """Best effort, never blocking: the socket is non-blocking and a short write is dropped."""
    with contextlib.suppress(OSError):
        sock.send(response)
    sock.close()


class _Server(socketserver.TCPServer):
    """The listener, the head-reading loop (:meth:`serve_forever`) and the handler bound."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        settings: MetricsSettings,
        metrics: Metrics,
        health: HealthState,
        retrain_trigger: RetrainTrigger | None,
        retrain_token: SecretStr | None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.metrics = metrics
        self.health = health
        self.retrain_trigger = retrain_trigger
        self.retrain_bearer = _bearer(retrain_token)
        self._timeout_s = settings.request_timeout_s
        self._max_connections = settings.max_connections
        self._handlers = threading.BoundedSemaphore(settings.max_handlers)
        self._pending: dict[socket.socket, _Client] = {}  # accept order: the oldest first
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake_reader, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        try:
            super().__init__((settings.host, settings.port), _Handler)
        except BaseException:
            self._wake_reader.close()
            self._waker.close()
            raise

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and read request heads until :meth:`shutdown` (``poll_interval`` unused:
        the loop sleeps until a socket is ready, a deadline falls due, or it is woken)."""
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set():
                    for key, _ in selector.select(self._expire(selector)):
                        if key.fileobj is self.socket:
                            self._accept(selector)
                        elif key.fileobj is self._wake_reader:
                            self._wake_reader.recv(_RECV_BYTES)
                        else:
                            self._receive(selector, key.data)
            finally:
                for client in self._pending.values():
                    client.sock.close()
                self._pending.clear()
                self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned."""
        self._stopping.set()
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            self._waker.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._waker.close()

    def _expire(self, selector: selectors.BaseSelector) -> float | None:
        """Close the connections past their deadline; seconds until the next one falls due."""
        now = time.monotonic()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return oldest.deadline - now
            self._drop(selector, oldest)
        return None

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. out of file descriptors: make room, or pause briefly
                log_event(logger, "ops_http_accept_failed", logging.WARNING, error=str(exc))
                if self._pending:
                    self._drop(selector, next(iter(self._pending.values())))
                else:
                    self._stopping.wait(0.1)
                return
            sock.setblocking(False)
            if len(self._pending) >= self._max_connections:
                self._drop(selector, next(iter(self._pending.values())))
            client = _Client(sock, address, time.monotonic() + self._timeout_s)
            self._pending[sock] = client
            selector.register(sock, selectors.EVENT_READ, client)

    def _receive(self, selector: selectors.BaseSelector, client: _Client) -> None:
        try:
            chunk = client.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed or reset the connection
            self._drop(selector, client)
            return
        client.received += chunk
        tail = client.received[-(len(chunk) + 3) :]
        if b"\n\r\n" in tail or b"\n\n" in tail:  # the blank line that ends the head
            self._forget(selector, client)
            self._dispatch(client)
        elif len(client.received) > _MAX_HEAD_BYTES:
            self._forget(selector, client)
            error = {"error": f"request line and headers exceed {_MAX_HEAD_BYTES} bytes"}
            _send_and_close(client.sock, _answer(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, error))

    def _dispatch(self, client: _Client) -> None:
        if not self._handlers.acquire(blocking=False):
            log_event(logger, "ops_http_busy", logging.DEBUG, client=str(client.address[0]))
            busy = _answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy"}, {"Retry-After": "1"})
            _send_and_close(client.sock, busy)
            return
        threading.Thread(target=self._handle, args=(client,), name="ops-http-handler", daemon=True).start()

    def _handle(self, client: _Client) -> None:
        try:
            _Handler(client, client.address, self)
        except OSError as exc:  # the client went away, or the deadline passed mid-answer
            log_event(logger, "ops_http_connection_failed", logging.DEBUG, error=repr(exc))
        except Exception as exc:
            log_event(logger, "ops_http_handler_failed", logging.ERROR, error=repr(exc))
        finally:
            client.sock.close()
            self._handlers.release()

    def _forget(self, selector: selectors.BaseSelector, client: _Client) -> None:
        selector.unregister(client.sock)
        del self._pending[client.sock]

    def _drop(self, selector: selectors.BaseSelector, client: _Client) -> None:
        self._forget(selector, client)
        client.sock.close()


# ------------------------------------------------------------------ endpoints


class _Handler(BaseHTTPRequestHandler):
    """One request of one :class:`_Client`, whose head has fully arrived."""

    server: _Server
    server_version = "stream-classifier"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection

    def __init__(self, client: _Client, address: Any, server: _Server) -> None:
        self._client = client
        super().__init__(client.sock, address, server)  # handles the request

    def setup(self) -> None:
        self.connection = self._client.sock
        stream = _DeadlineStream(self._client)
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
