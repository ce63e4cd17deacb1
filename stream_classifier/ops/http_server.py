"""The connection layer of the ops HTTP server: bounded in connections, threads and time.

- **One deadline per connection**: it is closed at the latest ``request_timeout_s`` after
  its accept; every read and write on it ends by then (:class:`DeadlineStream`).
- **Idle connections cost no thread**: one thread accepts and reads request heads without
  blocking, at most :data:`MAX_HEAD_BYTES` each (431 beyond), and holds at most
  ``max_connections`` of them; a new one beyond that closes the oldest.
- **Bounded handlers**: a complete head gets a handler thread; at most ``max_handlers`` run
  at once, and a request beyond that is answered 503 at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from stream_classifier.ops.logs import log_event

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

logger = logging.getLogger(__name__)

# Request line and headers together; the endpoints need a few hundred bytes.
MAX_HEAD_BYTES = 16_384
RECV_BYTES = 4_096


def answer(status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
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


@dataclass(eq=False)
class Client:
    """An accepted connection: its socket, peer, deadline and the bytes received so far."""

    sock: socket.socket
    address: Any
    deadline: float
    received: bytearray = field(default_factory=bytearray)


class DeadlineStream(io.RawIOBase):
    """A client's socket as a raw stream: the bytes already received first, then the
    socket's; every read and write on the socket ends by the client's deadline
    (:class:`TimeoutError` once it has passed)."""

    def __init__(self, client: Client) -> None:
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


def send_and_close(sock: socket.socket, response: bytes) -> None:
    """Best effort, never blocking: the socket is non-blocking and a short write is dropped."""
    with contextlib.suppress(OSError):
        sock.send(response)
    sock.close()


class BoundedHTTPServer(socketserver.TCPServer):
    """The listener, the head-reading loop (:meth:`serve_forever`) and the handler bound.

    ``handler`` is called with each client whose request head has fully arrived, on a
    thread of its own (at most ``max_handlers`` at once); the socket is closed after it.
    """

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[Client], object],
        *,
        request_timeout_s: float,
        max_connections: int,
        max_handlers: int,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._handler = handler
        self._timeout_s = request_timeout_s
        self._max_connections = max_connections
        self._handlers = threading.BoundedSemaphore(max_handlers)
        self._pending: dict[socket.socket, Client] = {}  # accept order: the oldest first
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake_reader, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        try:
            super().__init__((host, port), socketserver.BaseRequestHandler)
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
                            self._wake_reader.recv(RECV_BYTES)
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
            client = Client(sock, address, time.monotonic() + self._timeout_s)
            self._pending[sock] = client
            selector.register(sock, selectors.EVENT_READ, client)

    def _receive(self, selector: selectors.BaseSelector, client: Client) -> None:
        try:
            chunk = client.sock.recv(RECV_BYTES)
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
        elif len(client.received) > MAX_HEAD_BYTES:
            self._forget(selector, client)
            error = {"error": f"request line and headers exceed {MAX_HEAD_BYTES} bytes"}
            send_and_close(client.sock, answer(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, error))

    def _dispatch(self, client: Client) -> None:
        if not self._handlers.acquire(blocking=False):
            log_event(logger, "ops_http_busy", logging.DEBUG, client=str(client.address[0]))
            busy = answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy"}, {"Retry-After": "1"})
            send_and_close(client.sock, busy)
            return
        threading.Thread(target=self._handle, args=(client,), name="ops-http-handler", daemon=True).start()

    def _handle(self, client: Client) -> None:
        try:
            self._handler(client)
        except OSError as exc:  # the client went away, or the deadline passed mid-answer
            log_event(logger, "ops_http_connection_failed", logging.DEBUG, error=repr(exc))
        except Exception as exc:
            log_event(logger, "ops_http_handler_failed", logging.ERROR, error=repr(exc))
        finally:
            client.sock.close()
            self._handlers.release()

    def _forget(self, selector: selectors.BaseSelector, client: Client) -> None:
        selector.unregister(client.sock)
        del self._pending[client.sock]

    def _drop(self, selector: selectors.BaseSelector, client: Client) -> None:
        self._forget(selector, client)
        client.sock.close()
