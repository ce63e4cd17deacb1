"""The transport: a small Kafka client interface and its kafka-python implementation.

The service talks only to :class:`Consumer` and :class:`Producer`; :func:`make_transport`
picks the implementation named by ``settings.kafka.transport``: kafka-python (here, the
default) or confluent-kafka (:mod:`stream_classifier.stream.confluent_io`, the ``[fast]``
extra, imported only when chosen). An implementation:

- returns :class:`Record` objects (topic, partition, offset, key, value, headers, timestamp);
- raises :class:`~stream_classifier.errors.BrokerUnavailableError` for failures that may pass
  (the service retries them) and :class:`~stream_classifier.errors.TransportError` for those
  that will not (bad credentials, bad client configuration);
- calls a :class:`RebalanceListener` from inside :meth:`Consumer.poll`, on the polling thread
  (kafka-python runs its callbacks on its I/O thread, so there they arrive after the fact:
  ``on_revoked`` may find the partitions already gone, and must not rely on committing them);
- reports each produced record's fate exactly once through its ``on_delivery`` callback, on
  any thread (kafka-python: its I/O thread) — callers must hand the result over safely;
- never auto-commits: offsets move only through :meth:`Consumer.commit`, or through
  :meth:`Producer.send_offsets_to_transaction` for a transactional producer (exactly-once).

Secrets (the SASL password) reach the client and nothing else: :func:`describe_client_config`
is the loggable view.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerr
from kafka.record import util as kafka_record_util
from kafka.structs import OffsetAndMetadata
from pydantic import SecretStr

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError, ConfigError, TransportError
from stream_classifier.ops.logs import log_event

logger = logging.getLogger(__name__)

Headers = tuple[tuple[str, bytes], ...]
DeliveryCallback = Callable[[BaseException | None], None]


class Partition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message. ``timestamp_ms`` is the record's CreateTime/LogAppendTime."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None

    @property
    def tp(self) -> Partition:
        return Partition(self.topic, self.partition)


class RebalanceListener(Protocol):
    def on_revoked(self, partitions: Sequence[Partition]) -> None:
        """Partitions are being taken away; the consumer may still commit them."""

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        """Partitions were given; consumption resumes from their committed offsets."""

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        """Partitions were taken away without the chance to commit (evicted from the group)."""


class Consumer(Protocol):
    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None: ...
    def poll(self, timeout_s: float, max_records: int) -> list[Record]: ...
    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Synchronously commit ``offsets`` (the next offset to read, per partition)."""

    def seek(self, partition: Partition, offset: int) -> None: ...
    def pause(self, partitions: Iterable[Partition]) -> None: ...
    def resume(self, partitions: Iterable[Partition]) -> None: ...
    def assignment(self) -> set[Partition]: ...
    def position(self, partition: Partition) -> int: ...
    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]: ...
    def group_metadata(self) -> object:
        """The client's group metadata, for :meth:`Producer.send_offsets_to_transaction`."""

    def connected(self) -> bool: ...
    def close(self) -> None:
        """Leave the group and release the connection."""


class Producer(Protocol):
    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Headers,
        on_delivery: DeliveryCallback,
    ) -> None:
        """Queue one record; ``on_delivery`` gets ``None`` once acknowledged, else the error."""

    def poll(self, timeout_s: float) -> None:
        """Serve delivery callbacks where the client needs the caller's thread (a no-op otherwise)."""

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record is acknowledged or failed; False on timeout."""

    # Transactions: only on a producer made with a ``transactional_id``.
    def init_transactions(self, timeout_s: float) -> None:
        """Fence older producers with the same transactional id and abort their open transaction."""

    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(
        self, offsets: Mapping[Partition, int], consumer: Consumer, timeout_s: float
    ) -> None:
        """Commit ``offsets`` for ``consumer``'s group if, and only if, the transaction commits."""

    def commit_transaction(self, timeout_s: float) -> None: ...
    def abort_transaction(self, timeout_s: float) -> None: ...

    def connected(self) -> bool: ...
    def close(self, timeout_s: float) -> None: ...


class Transport(Protocol):
    def consumer(self, *, read_committed: bool = False) -> Consumer:
        """A group consumer; ``read_committed`` skips records of open and aborted transactions."""

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        """A producer; with ``transactional_id``, a transactional one (exactly-once)."""


# --------------------------------------------------------------------------- kafka-python

# Settings the service relies on; pass-through properties may not change them.
_RESERVED_CONSUMER = {"enable_auto_commit": False}


def kafka_python_common_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings shared by consumer and producer (holds the secret)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": list(k.bootstrap_servers),
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
    }
    cfg.update(
        security_config(
            k,
            sasl_mechanism="sasl_mechanism",
            sasl_username="sasl_plain_username",
            sasl_password="sasl_plain_password",
            ssl_cafile="ssl_cafile",
            ssl_certfile="ssl_certfile",
            ssl_keyfile="ssl_keyfile",
        )
    )
    return cfg


def security_config(k: KafkaSettings, **client_names: str) -> dict[str, Any]:
    """The SASL/SSL settings that are set, each under its client's name (holds the secret).

    ``client_names`` maps a :class:`KafkaSettings` field to the client's property name;
    secrets are revealed and paths become strings.
    """
    cfg: dict[str, Any] = {}
    for setting, name in client_names.items():
        value = getattr(k, setting)
        if isinstance(value, SecretStr):
            cfg[name] = value.get_secret_value()
        elif isinstance(value, Path):
            cfg[name] = str(value)
        elif value is not None:
            cfg[name] = value
    return cfg


def kafka_python_consumer_config(k: KafkaSettings, *, read_committed: bool = False) -> dict[str, Any]:
    cfg = kafka_python_common_config(k)
    cfg.update(
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        group_id=k.group_id,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_records=k.max_poll_records,
        max_partition_fetch_bytes=max(k.max_request_size, 1_048_576),
    )
    return with_consumer_properties(cfg, k.consumer_properties, _RESERVED_CONSUMER)


def with_consumer_properties(
    cfg: dict[str, Any], properties: Mapping[str, Any], reserved: Mapping[str, Any]
) -> dict[str, Any]:
    """``cfg`` with the pass-through ``properties`` applied; the ``reserved`` settings stay as given.

    Raises :class:`ConfigError` if ``properties`` tries to change a reserved setting.
    """
    cfg.update(properties)
    for name, required in reserved.items():
        if cfg.get(name, required) != required:
            raise ConfigError(
                f"setting 'kafka.consumer_properties.{name}' must not be set: the service commits "
                "offsets itself, after the outputs are acknowledged"
            )
    cfg.update(reserved)
    return cfg


def kafka_python_producer_config(k: KafkaSettings, *, transactional_id: str | None = None) -> dict[str, Any]:
    cfg = kafka_python_common_config(k)
    # acks=all + idempotence keep per-partition order across retries; a bounded block time
    # turns a missing broker into a retried error instead of a minute-long stall; a 5 ms
    # linger (librdkafka's default) sends a batch's outputs in a few requests instead of one
    # each, which on a small CPU leaves more of it to the model (see BENCHMARKS.md).
    cfg.update(
        acks="all",
        enable_idempotence=True,
        max_request_size=k.max_request_size,
        max_block_ms=10_000,
        linger_ms=5,
    )
    cfg.update(k.producer_properties)
    if transactional_id is not None:
        cfg["transactional_id"] = transactional_id
    return cfg


_SECRET_KEYS = {"sasl_plain_password", "sasl.password", "ssl_password", "ssl.key.password"}


def crc32c_implementation() -> str:
    """How kafka-python checksums record batches (CRC-32C, every batch produced and fetched):
    ``c`` when the ``crc32c`` package (extra ``[fast]``) is installed, else ``python``, its
    pure-Python fallback: consuming ~2.5-3x and producing ~1.7x slower (BENCHMARKS.md)."""
    return "c" if kafka_record_util.crc32c_c is not None else "python"


def describe_client_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with secrets masked: the only form a client configuration may be logged in."""
    return {key: ("**********" if key in _SECRET_KEYS else value) for key, value in cfg.items()}


def _translate(exc: Exception, action: str) -> Exception:
    """Map a kafka-python error to the package's transient/fatal pair."""
    fatal = (
        kerr.KafkaConfigurationError,
        kerr.AuthorizationError,
        kerr.SaslAuthenticationFailedError,
        kerr.IllegalStateError,
    )
    if isinstance(exc, fatal):
        return TransportError(f"{action} failed: {type(exc).__name__}: {exc}; check the kafka.* settings")
    return BrokerUnavailableError(f"{action} failed: {type(exc).__name__}: {exc}")


def _call(action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (kerr.KafkaError, OSError) as exc:
        raise _translate(exc, action) from exc


class _ListenerAdapter(ConsumerRebalanceListener):  # type: ignore[misc]
    """Queues kafka-python's rebalance callbacks, which run on its I/O thread.

    They must not block there (heartbeats share that thread), so the partitions change first
    and :meth:`KafkaPythonConsumer.poll` tells the service afterwards, on the polling thread.
    """

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, list[Partition]]] = queue.SimpleQueue()

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.events.put(("revoked", _partitions(revoked)))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.events.put(("assigned", _partitions(assigned)))

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self.events.put(("lost", _partitions(lost)))


def _partitions(tps: Iterable[TopicPartition]) -> list[Partition]:
    return sorted(Partition(tp.topic, tp.partition) for tp in tps)


class KafkaPythonConsumer:
    def __init__(self, settings: KafkaSettings, *, read_committed: bool = False) -> None:
        cfg = kafka_python_consumer_config(settings, read_committed=read_committed)
        crc32c = crc32c_implementation()
        log_event(logger, "kafka_consumer_config", config=describe_client_config(cfg), crc32c=crc32c)
        self._consumer = _call("connecting the consumer", KafkaConsumer, **cfg)
        self._rebalances = _ListenerAdapter()
        self._listener: RebalanceListener | None = None

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._listener = listener
        _call("subscribing", self._consumer.subscribe, list(topics), listener=self._rebalances)

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        self._dispatch_rebalances()
        batches = _call("polling", self._consumer.poll, int(timeout_s * 1000), max_records=max_records)
        if self._dispatch_rebalances():  # drop what was fetched for partitions no longer ours
            assigned = self._consumer.assignment()
            batches = {tp: records for tp, records in batches.items() if tp in assigned}
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
            for records in batches.values()
            for r in records
        ]

    def _dispatch_rebalances(self) -> bool:
        """Tell the listener about queued rebalance events, in order; True if there were any."""
        seen = False
        while True:
            try:
                kind, partitions = self._rebalances.events.get_nowait()
            except queue.Empty:
                return seen
            seen = True
            if self._listener is not None:
                getattr(self._listener, f"on_{kind}")(partitions)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        payload = {TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        _call("committing offsets", self._consumer.commit, payload)

    def seek(self, partition: Partition, offset: int) -> None:
        _call("seeking", self._consumer.seek, TopicPartition(*partition), offset)

    def pause(self, partitions: Iterable[Partition]) -> None:
        self._consumer.pause(*(TopicPartition(*tp) for tp in partitions))

    def resume(self, partitions: Iterable[Partition]) -> None:
        self._consumer.resume(*(TopicPartition(*tp) for tp in partitions))

    def assignment(self) -> set[Partition]:
        return {Partition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def position(self, partition: Partition) -> int:
        position: int = _call("reading the position", self._consumer.position, TopicPartition(*partition))
        return position

    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        ends = _call(
            "reading end offsets", self._consumer.end_offsets, [TopicPartition(*p) for p in partitions]
        )
        return {Partition(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def group_metadata(self) -> object:
        return self._consumer.group_metadata()

    def connected(self) -> bool:
        return bool(self._consumer.bootstrap_connected())

    def close(self) -> None:
        _call("closing the consumer", self._consumer.close, autocommit=False)


class KafkaPythonProducer:
    def __init__(self, settings: KafkaSettings, *, transactional_id: str | None = None) -> None:
        cfg = kafka_python_producer_config(settings, transactional_id=transactional_id)
        crc32c = crc32c_implementation()
        log_event(logger, "kafka_producer_config", config=describe_client_config(cfg), crc32c=crc32c)
        self._producer = _call("connecting the producer", KafkaProducer, **cfg)

    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Headers,
        on_delivery: DeliveryCallback,
    ) -> None:
        future = _call("producing", self._producer.send, topic, value=value, key=key, headers=list(headers))
        future.add_callback(lambda _metadata: on_delivery(None))
        future.add_errback(on_delivery)

    def poll(self, timeout_s: float) -> None:
        return None

    def flush(self, timeout_s: float) -> bool:
        try:
            self._producer.flush(timeout=timeout_s)
        except kerr.KafkaTimeoutError:
            return False
        return True

    # kafka-python bounds each transactional call by max_block_ms rather than a timeout.
    def init_transactions(self, timeout_s: float) -> None:
        _call("initialising transactions", self._producer.init_transactions)

    def begin_transaction(self) -> None:
        _call("beginning a transaction", self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[Partition, int], consumer: Consumer, timeout_s: float
    ) -> None:
        payload = {TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        _call(
            "adding offsets to the transaction",
            self._producer.send_offsets_to_transaction,
            payload,
            consumer.group_metadata(),
        )

    def commit_transaction(self, timeout_s: float) -> None:
        _call("committing the transaction", self._producer.commit_transaction)

    def abort_transaction(self, timeout_s: float) -> None:
        _call("aborting the transaction", self._producer.abort_transaction)

    def connected(self) -> bool:
        return bool(self._producer.bootstrap_connected())

    def close(self, timeout_s: float) -> None:
        self._producer.close(timeout=timeout_s)


class KafkaPythonTransport:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        kafka_python_consumer_config(settings)  # configuration errors surface at start-up

    def consumer(self, *, read_committed: bool = False) -> Consumer:
        return KafkaPythonConsumer(self._settings, read_committed=read_committed)

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        return KafkaPythonProducer(self._settings, transactional_id=transactional_id)


def make_transport(settings: KafkaSettings) -> Transport:
    """The transport named by ``settings.transport`` (confluent-kafka is imported only then)."""
    if settings.transport == "confluent":
        from stream_classifier.stream.confluent_io import ConfluentTransport  # noqa: PLC0415 - [fast] extra

        return ConfluentTransport(settings)
    return KafkaPythonTransport(settings)
