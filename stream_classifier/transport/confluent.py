"""The confluent-kafka (librdkafka) transport: the same Consumer/Producer interface, faster.

Chosen by ``kafka.transport: confluent`` and installed with ``pip install
'stream-classifier[fast]'``; this module is imported only then. It keeps the contract of
:mod:`stream_classifier.transport.base`:

- rebalance callbacks run inside :meth:`ConfluentConsumer.poll`, on the polling thread
  (librdkafka serves them from ``consume``);
- delivery reports are served by :meth:`ConfluentProducer.poll` / ``flush`` on the caller's
  thread and reach each record's ``on_delivery`` exactly once;
- offsets are never committed automatically;
- librdkafka retries connections itself; its errors map to
  :class:`~stream_classifier.errors.BrokerUnavailableError` (transient) or
  :class:`~stream_classifier.errors.TransportError` (fatal, e.g. authentication). What it
  reports only to its error callback while reconnecting (refused credentials, a failing TLS
  handshake: :class:`ClientErrors`) is raised by the client's next ``poll``/``send``, and a
  topic the ACLs deny, which it reports once among the messages, by that ``poll``.

Settings and pass-through properties use librdkafka's dotted names
(``kafka.producer_properties: {linger.ms: 5}``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import (
    BrokerUnavailableError,
    ConfigError,
    RecordRejectedError,
    TransportError,
)
from stream_classifier.ops.logs import log_event
from stream_classifier.transport.base import (
    Consumer,
    DeliveryCallback,
    Headers,
    Partition,
    Producer,
    RebalanceListener,
    Record,
)
from stream_classifier.transport.client_config import (
    confluent_consumer_config,
    confluent_producer_config,
    describe_client_config,
)
from stream_classifier.transport.reader import denied_topics_error, principal_hint

try:
    import confluent_kafka as ck
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ConfigError(
        "setting 'kafka.transport' is 'confluent' but confluent-kafka is not installed: "
        "pip install 'stream-classifier[fast]', or use transport 'kafka-python'"
    ) from None

logger = logging.getLogger(__name__)
# librdkafka's own log lines (connection failures while it retries, ...) go through logging,
# not straight to stderr.
librdkafka_logger = logging.getLogger(f"{__name__}.librdkafka")

# How long send() keeps serving delivery reports while librdkafka's local queue is full
# before it reports the broker as unavailable (kafka-python's max_block_ms counterpart).
_QUEUE_FULL_BLOCK_S = 10.0
_FATAL_CODES = {
    "_AUTHENTICATION",
    "SASL_AUTHENTICATION_FAILED",
    "TOPIC_AUTHORIZATION_FAILED",
    "GROUP_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "_INVALID_ARG",
    "_SSL",
}


# Codes by which the broker (or librdkafka's own checks) refuse one record for good.
_REFUSAL_CODES = {
    "MSG_SIZE_TOO_LARGE",
    "INVALID_MSG_SIZE",
    "INVALID_MSG",
    "INVALID_RECORD",
    "INVALID_TIMESTAMP",
    "RECORD_LIST_TOO_LARGE",
    "TOPIC_AUTHORIZATION_FAILED",
    "TOPIC_EXCEPTION",
    "UNSUPPORTED_FOR_MESSAGE_FORMAT",
}


def _translate_produce(error: ck.KafkaError, topic: str) -> Exception:
    """A delivery error as the service sees it: refused for good, or worth a retry."""
    if error.name() in _REFUSAL_CODES:
        return RecordRejectedError(
            f"the record for topic {topic!r} was refused: {error.name()}: {error.str()}"
        )
    return translate(ck.KafkaException(error), f"producing to topic {topic!r}")


def translate(exc: BaseException, action: str) -> Exception:
    """Map a librdkafka error to the package's transient/fatal pair."""
    error = exc.args[0] if exc.args and isinstance(exc.args[0], ck.KafkaError) else None
    if error is not None and (error.fatal() or error.name() in _FATAL_CODES):
        return TransportError(f"{action} failed: {error.name()}: {error.str()}; check the kafka.* settings")
    if error is not None:
        return BrokerUnavailableError(f"{action} failed: {error.name()}: {error.str()}")
    return BrokerUnavailableError(f"{action} failed: {type(exc).__name__}: {exc}")


def _call(action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ck.KafkaException as exc:
        raise translate(exc, action) from exc


# Errors librdkafka reports to ``error_cb`` while it reconnects by itself that reconnecting
# cannot cure, and after how many of them the client gives up: credentials the broker
# refuses (librdkafka reads the broker's reply every time), a TLS handshake that fails
# (certificate verification, counted thrice: a single one may be a connection torn down
# mid-handshake).
_CONNECT_FATAL = {"_AUTHENTICATION": 1, "SASL_AUTHENTICATION_FAILED": 1, "_SSL": 3}
# How librdkafka says it could not get an OAUTHBEARER token (its OIDC endpoint is down).
_TOKEN_FETCH_FAILED = "Failed to acquire SASL OAUTHBEARER token"
_FIX_HINT = {
    "_AUTHENTICATION": "check kafka.sasl_username, kafka.sasl_password and kafka.sasl_mechanism",
    "SASL_AUTHENTICATION_FAILED": "check kafka.sasl_username, kafka.sasl_password and kafka.sasl_mechanism",
    "_SSL": "check kafka.ssl_cafile, kafka.ssl_certfile and kafka.ssl_keyfile",
}


class ClientErrors:
    """librdkafka's error callback: logs every error and keeps the first one that will not
    pass (:data:`_CONNECT_FATAL`, or one librdkafka calls fatal), for :meth:`raise_if_fatal`.

    librdkafka calls it from ``poll``/``consume``/``flush``, on the caller's thread.
    """

    def __init__(self, role: str) -> None:
        self._role = role
        self._counts: dict[str, int] = {}
        self.fatal: ck.KafkaError | None = None

    def __call__(self, error: ck.KafkaError) -> None:
        log_event(logger, "kafka_client_error", logging.DEBUG, role=self._role, error=error.str())
        name = error.name()
        if name == "_AUTHENTICATION" and _TOKEN_FETCH_FAILED in error.str():
            return  # the OIDC token endpoint did not answer (pass-through OAUTHBEARER): it may yet
        self._counts[name] = self._counts.get(name, 0) + 1
        if self.fatal is None and (error.fatal() or self._counts[name] >= _CONNECT_FATAL.get(name, 1 << 30)):
            self.fatal = error

    def raise_if_fatal(self, action: str) -> None:
        error = self.fatal
        if error is not None:
            hint = _FIX_HINT.get(error.name(), "check the kafka.* settings")
            raise TransportError(f"{action} failed: {error.name()}: {error.str()}; {hint}")


def _record(message: Any) -> Record:
    """The message as a :class:`Record`; without headers when a header name is not UTF-8.

    The binding cannot decode such a name: it raises, or leaves the error to surface at the
    next call (as a ``SystemError``), so the whole construction is guarded. Key, value and
    offset are intact, so the record is served; only a dead letter of it lacks the headers.
    """
    kind, timestamp = message.timestamp()
    coordinates = (message.topic(), message.partition(), message.offset())
    key, value = message.key(), message.value()
    when = timestamp if kind != ck.TIMESTAMP_NOT_AVAILABLE else None
    try:
        return Record(*coordinates, key, value, tuple(message.headers() or ()), when)
    except (UnicodeDecodeError, SystemError) as exc:
        log_event(
            logger,
            "undecodable_headers",
            logging.WARNING,
            record="{}:{}:{}".format(*coordinates),
            error=str(exc)[:200],
        )
        return Record(*coordinates, key, value, (), when)


def records_of(
    messages: Iterable[Any], action: str, settings: KafkaSettings, topics: list[str]
) -> list[Record]:
    """The records among ``messages``; raises for an error event that will not pass.

    librdkafka reports a topic the ACLs deny (or a group) once, as an error event among the
    messages, and then fetches nothing from it: that is fatal, not a message to skip.
    """
    records: list[Record] = []
    for message in messages:
        error = message.error()
        if error is None:
            records.append(_record(message))
        elif error.name() == "TOPIC_AUTHORIZATION_FAILED":
            denied = [message.topic()] if message.topic() else topics
            raise denied_topics_error(denied, principal_hint(settings), action)
        elif error.fatal() or error.name() in _FATAL_CODES:
            raise translate(ck.KafkaException(error), action)
        else:
            log_event(logger, "kafka_consumer_error", logging.DEBUG, error=error.str())
    return records


def _partitions(tps: Iterable[ck.TopicPartition]) -> list[Partition]:
    return sorted(Partition(tp.topic, tp.partition) for tp in tps)


def _tps(partitions: Iterable[Partition], offsets: Mapping[Partition, int] | None = None) -> list[Any]:
    if offsets is None:
        return [ck.TopicPartition(tp.topic, tp.partition) for tp in partitions]
    return [ck.TopicPartition(tp.topic, tp.partition, offsets[tp]) for tp in partitions]


class ConfluentConsumer:
    def __init__(self, settings: KafkaSettings, *, read_committed: bool = False) -> None:
        cfg = confluent_consumer_config(settings, read_committed=read_committed)
        log_event(logger, "kafka_consumer_config", config=describe_client_config(cfg))
        self._settings = settings
        self._errors = ClientErrors("consumer")
        cfg.update(error_cb=self._errors, logger=librdkafka_logger)
        self._consumer = _call("connecting the consumer", ck.Consumer, cfg)
        self._topics: list[str] = []

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._topics = list(topics)
        _call(
            "subscribing",
            self._consumer.subscribe,
            list(topics),
            on_assign=lambda _c, tps: listener.on_assigned(_partitions(tps)),
            on_revoke=lambda _c, tps: listener.on_revoked(_partitions(tps)),
            on_lost=lambda _c, tps: listener.on_lost(_partitions(tps)),
        )

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        action = f"polling topic(s) {self._topics}"
        messages = _call(action, self._consumer.consume, num_messages=max_records, timeout=timeout_s)
        self._errors.raise_if_fatal(action)
        return records_of(messages, action, self._settings, self._topics)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        _call("committing offsets", self._consumer.commit, offsets=_tps(offsets, offsets), asynchronous=False)

    def seek(self, partition: Partition, offset: int) -> None:
        _call("seeking", self._consumer.seek, ck.TopicPartition(partition[0], partition[1], offset))

    def pause(self, partitions: Iterable[Partition]) -> None:
        _call("pausing", self._consumer.pause, _tps(Partition(*tp) for tp in partitions))

    def resume(self, partitions: Iterable[Partition]) -> None:
        _call("resuming", self._consumer.resume, _tps(Partition(*tp) for tp in partitions))

    def assignment(self) -> set[Partition]:
        return set(_partitions(_call("reading the assignment", self._consumer.assignment)))

    def retained(self, revoked: Iterable[Partition]) -> set[Partition]:
        # on_revoke runs before the partitions go (assignment() still lists them); one given
        # back is read again from its committed offset, so no revoked partition keeps state.
        return set()

    def position(self, partition: Partition) -> int:
        (tp,) = _call("reading the position", self._consumer.position, _tps([Partition(*partition)]))
        if tp.offset >= 0:
            return int(tp.offset)
        return self.end_offsets([partition])[partition]  # nothing fetched yet: no known lag

    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        # The high watermark each fetch response carries (cached: no request, so the I/O thread
        # never waits here); a partition not fetched yet asks its leader, within 5 s. An
        # uncached query can stall far past its timeout while the group rebalances.
        ends: dict[Partition, int] = {}
        for tp in partitions:
            _low, high = _call(
                "reading end offsets",
                self._consumer.get_watermark_offsets,
                ck.TopicPartition(*tp),
                cached=True,
            )
            if high < 0:
                _low, high = _call(
                    "reading end offsets",
                    self._consumer.get_watermark_offsets,
                    ck.TopicPartition(*tp),
                    timeout=5.0,
                    cached=False,
                )
            ends[tp] = int(high)
        return ends

    def group_metadata(self) -> object:
        return _call("reading the group metadata", self._consumer.consumer_group_metadata)

    def close(self) -> None:
        _call("closing the consumer", self._consumer.close)


class ConfluentProducer:
    def __init__(self, settings: KafkaSettings, *, transactional_id: str | None = None) -> None:
        cfg = confluent_producer_config(settings, transactional_id=transactional_id)
        log_event(logger, "kafka_producer_config", config=describe_client_config(cfg))
        self._errors = ClientErrors("producer")
        cfg.update(error_cb=self._errors, logger=librdkafka_logger)
        self._producer = _call("connecting the producer", ck.Producer, cfg)

    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Headers,
        on_delivery: DeliveryCallback,
        timestamp_ms: int | None = None,
    ) -> None:
        def report(error: ck.KafkaError | None, _message: Any) -> None:
            on_delivery(None if error is None else _translate_produce(error, topic))

        self._errors.raise_if_fatal(f"producing to topic {topic!r}")
        deadline = time.monotonic() + _QUEUE_FULL_BLOCK_S
        while True:
            try:
                self._producer.produce(
                    topic, value, key, headers=list(headers), on_delivery=report, timestamp=timestamp_ms or 0
                )
                return
            except BufferError:  # local queue full: serve reports until there is room
                if time.monotonic() > deadline:
                    raise BrokerUnavailableError(
                        f"producing failed: the local queue stayed full for {_QUEUE_FULL_BLOCK_S:.0f} s"
                    ) from None
                self._producer.poll(0.05)
            except ck.KafkaException as exc:
                error = exc.args[0] if exc.args and isinstance(exc.args[0], ck.KafkaError) else None
                if error is not None and error.name() in _REFUSAL_CODES:
                    raise _translate_produce(error, topic) from exc
                raise translate(exc, "producing") from exc
            except (TypeError, ValueError) as exc:
                raise RecordRejectedError(f"the record was refused: {type(exc).__name__}: {exc}") from exc

    def poll(self, timeout_s: float) -> None:
        self._producer.poll(timeout_s)
        self._errors.raise_if_fatal("producing")

    def flush(self, timeout_s: float) -> bool:
        # A fatal client error surfaces at the next send() or poll(), not here: shutdown flushes.
        remaining: int = self._producer.flush(timeout_s)
        return remaining == 0

    def init_transactions(self, timeout_s: float) -> None:
        _call("initialising transactions", self._producer.init_transactions, timeout_s)

    def begin_transaction(self) -> None:
        _call("beginning a transaction", self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[Partition, int], consumer: Consumer, timeout_s: float
    ) -> None:
        _call(
            "adding offsets to the transaction",
            self._producer.send_offsets_to_transaction,
            _tps(offsets, offsets),
            consumer.group_metadata(),
            timeout_s,
        )

    def commit_transaction(self, timeout_s: float) -> None:
        _call("committing the transaction", self._producer.commit_transaction, timeout_s)

    def abort_transaction(self, timeout_s: float) -> None:
        _call("aborting the transaction", self._producer.abort_transaction, timeout_s)

    def close(self, timeout_s: float) -> None:
        self._producer.flush(timeout_s)


class ConfluentTransport:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings

    def consumer(self, *, read_committed: bool = False) -> Consumer:
        return ConfluentConsumer(self._settings, read_committed=read_committed)

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        return ConfluentProducer(self._settings, transactional_id=transactional_id)
