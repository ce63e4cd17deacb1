"""Refused SASL credentials under kafka-python: seen, counted, and made fatal.

kafka-python 3.0 never reports refused credentials to its caller. Its bootstrap treats
every failed connection alike and retries until ``bootstrap_timeout_ms``, then raises a
bare ``KafkaTimeoutError``; and over TLS it reads the broker's SaslAuthenticate error only
now and then (the broker closes the connection right after sending it), so it often sees a
plain disconnect. A wrong password would therefore look like a broker that is down, and be
retried forever.

What does tell them apart: a SASL exchange *starts* only once the broker has accepted the
connection, answered ApiVersions and agreed to the mechanism (SaslHandshake), so the
broker is up; an exchange that then ends without the broker's acceptance was refused. The
mechanisms kafka-python uses for PLAIN and SCRAM are wrapped (through its public
``register_sasl_mechanism``, behaviour unchanged) to record how each exchange ended, per
(mechanism, user name). :func:`credentials_refused` says whether the last
:data:`REFUSALS_IN_A_ROW` exchanges for a user were all refused; the transport asks it
when a client fails to connect, and raises :class:`~stream_classifier.errors.TransportError`
(fatal) instead of :class:`~stream_classifier.errors.BrokerUnavailableError` if so.

A broker that is down starts no exchange, and one accepted exchange resets the count, so
an outage never reads as refused credentials.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from kafka.net import sasl as kafka_sasl

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import TransportError

REFUSALS_IN_A_ROW = 3
_WATCHED = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_KEPT = 8  # exchanges remembered per user


class _Exchange:
    __slots__ = ("accepted",)

    def __init__(self) -> None:
        self.accepted = False


class _Ledger:
    """How the latest SASL exchanges ended, per (mechanism, user name); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_user: dict[tuple[str, str], deque[_Exchange]] = {}

    def begin(self, mechanism: str, username: str) -> _Exchange:
        exchange = _Exchange()
        with self._lock:
            self._by_user.setdefault((mechanism, username), deque(maxlen=_KEPT)).append(exchange)
        return exchange

    def refused_in_a_row(self, mechanism: str, username: str) -> int:
        with self._lock:
            exchanges = list(self._by_user.get((mechanism, username), ()))
        count = 0
        for exchange in reversed(exchanges):
            if exchange.accepted:
                break
            count += 1
        return count


LEDGER = _Ledger()


def _watched(base: type[Any]) -> type[Any]:
    """``base`` (a kafka-python SASL mechanism) recording its exchange in :data:`LEDGER`."""

    class Watched(base):  # type: ignore[misc]
        def __init__(self, **config: Any) -> None:
            super().__init__(**config)
            self._exchange = LEDGER.begin(
                str(config.get("sasl_mechanism")), str(config.get("sasl_plain_username"))
            )

        def receive(self, auth_bytes: bytes) -> Any:
            result = super().receive(auth_bytes)
            if self.is_done() and self.is_authenticated():
                self._exchange.accepted = True
            return result

    Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
    return Watched


_install_lock = threading.Lock()


def install() -> None:
    """Wrap kafka-python's PLAIN and SCRAM mechanisms once per process (idempotent)."""
    with _install_lock:
        for name in _WATCHED:
            current = kafka_sasl.get_sasl_mechanism(name)
            if not getattr(current, "_stream_classifier_watched", False):
                wrapped = _watched(current)
                wrapped._stream_classifier_watched = True
                kafka_sasl.register_sasl_mechanism(name, wrapped, overwrite=True)


def credentials_refused(settings: KafkaSettings) -> bool:
    """Whether the broker refused the last :data:`REFUSALS_IN_A_ROW` exchanges for these credentials."""
    if not settings.security_protocol.startswith("SASL") or settings.sasl_mechanism not in _WATCHED:
        return False
    return LEDGER.refused_in_a_row(settings.sasl_mechanism, str(settings.sasl_username)) >= REFUSALS_IN_A_ROW


def refused_credentials_error(settings: KafkaSettings, action: str) -> TransportError:
    return TransportError(
        f"{action} failed: the broker at {','.join(settings.bootstrap_servers)} refused the SASL "
        f"credentials ({settings.sasl_mechanism} as user {settings.sasl_username!r}) "
        f"{REFUSALS_IN_A_ROW} times in a row; check kafka.sasl_username, kafka.sasl_password and "
        "kafka.sasl_mechanism (the broker's log names the cause)"
    )
