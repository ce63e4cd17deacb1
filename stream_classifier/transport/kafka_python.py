"""The kafka-python transport (the default): :mod:`.base`'s interface over kafka-python.

kafka-python keeps to itself two failures that retrying cannot cure, so they are read where
it leaves them: refused SASL credentials (:mod:`.kafka_python_auth`, when a client cannot
bootstrap) and topics the ACLs deny (its cluster metadata, when a poll fetches nothing).
Both raise :class:`~stream_classifier.errors.TransportError` naming the cause.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerr
from kafka.record import util as kafka_record_util
from kafka.structs import OffsetAndMetadata

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import (
    BrokerUnavailableError,
    RecordRejectedError,
    TransportError,
    UnreadableRecordError,
)
from stream_classifier.ops.logs import log_event
from stream_classifier.transport import kafka_python_auth
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
    describe_client_config,
    kafka_python_consumer_config,
    kafka_python_producer_config,
)
from stream_classifier.transport.reader import denied_topics_error, principal_hint

logger = logging.getLogger(__name__)


def crc32c_implementation() -> str:
    """How kafka-python checksums record batches (CRC-32C, every batch produced and fetched):
    ``c`` when the ``crc32c`` package (extra ``[fast]``) is installed, else ``python``, its
    pure-Python fallback: consuming ~2.5-3x and producing ~1.7x slower (docs/performance.md)."""
    return "c" if kafka_record_util.crc32c_c is not None else "python"


# Errors by which the broker (or the client's own checks) refuse one record for good.
_RECORD_REFUSALS = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.InvalidRecordError,
    kerr.CorruptRecordError,
    kerr.InvalidTimestampError,
    kerr.TopicAuthorizationFailedError,
    kerr.InvalidTopicError,
    kerr.UnsupportedForMessageFormatError,
)
_POSITION_TIMEOUT_MS = 5_000
_JOIN_POLL_S = 3.0  # the shortest poll while no partition is assigned
_CLOSE_TIMEOUT_MS = 2_000  # the longest a consumer's close (leaving the group) may take


def _translate_produce(exc: BaseException, topic: str) -> Exception:
    """A produce error as the service sees it: refused for good, or worth a retry."""
    if isinstance(exc, (*_RECORD_REFUSALS, TypeError, ValueError)):
        return RecordRejectedError(f"the record for topic {topic!r} was refused: {type(exc).__name__}: {exc}")
    if isinstance(exc, Exception):
        return translate(exc, f"producing to topic {topic!r}")
    return BrokerUnavailableError(f"producing to topic {topic!r} failed: {type(exc).__name__}: {exc}")


def translate(exc: Exception, action: str) -> Exception:
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
        raise translate(exc, action) from exc


def connect(settings: KafkaSettings, action: str, factory: Callable[..., Any], cfg: dict[str, Any]) -> Any:
    """``factory(**cfg)``, a kafka-python client that bootstraps as it is made.

    A failure to connect is transient unless the broker refused the SASL credentials (see
    :mod:`.kafka_python_auth`): then it is fatal, and says which settings to check.
    """
    kafka_python_auth.install()
    try:
        return factory(**cfg)
    except (kerr.KafkaError, OSError) as exc:
        if kafka_python_auth.credentials_refused(settings):
            raise kafka_python_auth.refused_credentials_error(settings, action) from exc
        raise translate(exc, action) from exc


def unauthorized_topics(client: Any, topics: Iterable[str]) -> list[str]:
    """Which of ``topics`` the last metadata reply of ``client`` (a kafka-python consumer)
    said this client may not see.

    kafka-python keeps them in its cluster metadata and otherwise goes on fetching nothing
    (a consumer subscribed to, or assigned, a denied topic polls empty forever); reading
    them there is the only way to see the denial. Empty on a kafka-python without them.
    """
    denied = getattr(getattr(client, "_cluster", None), "unauthorized_topics", None)
    if not isinstance(denied, set | frozenset):
        return []
    return sorted(set(topics) & denied)


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
        self._settings = settings
        self._consumer = connect(settings, "connecting the consumer", KafkaConsumer, cfg)
        self._rebalances = _ListenerAdapter()
        self._listener: RebalanceListener | None = None
        self._topics: list[str] = []

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._listener = listener
        self._topics = list(topics)
        _call("subscribing", self._consumer.subscribe, list(topics), listener=self._rebalances)

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        self._dispatch_rebalances()
        if not self._consumer.assignment():
            # kafka-python 3.0 can drop a group join that a poll's timeout cuts short (the
            # member then keeps no partitions for good); unassigned, there is nothing else to
            # do, so the poll waits long enough for a join to finish inside it.
            timeout_s = max(timeout_s, _JOIN_POLL_S)
        try:
            batches = self._consumer.poll(int(timeout_s * 1000), max_records=max_records)
        except (kerr.CorruptRecordError, UnicodeDecodeError) as exc:
            raise self._locate_unreadable(exc) from exc
        except (kerr.KafkaError, OSError) as exc:
            raise translate(exc, f"polling topic(s) {self._topics}") from exc
        if not batches and (denied := unauthorized_topics(self._consumer, self._topics)):
            raise denied_topics_error(denied, principal_hint(self._settings), "consuming")
        if self._dispatch_rebalances():  # drop what was fetched for partitions no longer ours
            assigned = self._consumer.assignment()
            batches = {tp: records for tp, records in batches.items() if tp in assigned}
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
            for records in batches.values()
            for r in records
        ]

    def _locate_unreadable(self, error: Exception) -> Exception:
        """The coordinates of the record kafka-python failed to parse.

        kafka-python's error names no partition, and polling again without moving that
        partition's position spins forever (3.0.x: the failed batch stays next in line). The
        failed batch's partition and next offset are read from the fetcher, the one place
        that holds them; without them (another kafka-python), the error is reported as
        transient. kafka-python parses a record batch from its start, so a record after an
        unreadable one in the same batch is unreadable to it too.
        """
        part = getattr(getattr(self._consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(part, "topic_partition", None)
        offset = getattr(part, "next_fetch_offset", None)
        if not isinstance(tp, TopicPartition) or not isinstance(offset, int):
            return BrokerUnavailableError(f"polling failed: {type(error).__name__}: {str(error)[:200]}")
        return UnreadableRecordError(
            f"kafka-python cannot parse the record at {tp.topic}:{tp.partition}:{offset} "
            f"({type(error).__name__}: {str(error)[:200]}); read it with another client",
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
        )

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

    def retained(self, revoked: Iterable[Partition]) -> set[Partition]:
        # Rebalance callbacks are dispatched after the rebalance: assignment() is the new one.
        return set(revoked) & self.assignment()

    def position(self, partition: Partition) -> int:
        position = _call(
            "reading the position",
            self._consumer.position,
            TopicPartition(*partition),
            timeout_ms=_POSITION_TIMEOUT_MS,
        )
        if position is None:
            raise BrokerUnavailableError(f"reading the position of {partition[0]}:{partition[1]} timed out")
        return int(position)

    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        ends = _call(
            "reading end offsets", self._consumer.end_offsets, [TopicPartition(*p) for p in partitions]
        )
        return {Partition(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def group_metadata(self) -> object:
        return self._consumer.group_metadata()

    def close(self) -> None:
        # Leaving the group is a courtesy (the session timeout evicts the member anyway), so
        # it is bounded: kafka-python would wait request_timeout_ms for a broker that is gone.
        _call("closing the consumer", self._consumer.close, autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)


class KafkaPythonProducer:
    def __init__(self, settings: KafkaSettings, *, transactional_id: str | None = None) -> None:
        cfg = kafka_python_producer_config(settings, transactional_id=transactional_id)
        crc32c = crc32c_implementation()
        log_event(logger, "kafka_producer_config", config=describe_client_config(cfg), crc32c=crc32c)
        self._producer = connect(settings, "connecting the producer", KafkaProducer, cfg)

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
        # kafka-python's send() takes header values as bytes only: a null value goes out empty.
        sendable = [(name, b"" if data is None else data) for name, data in headers]
        try:
            future = self._producer.send(
                topic, value=value, key=key, headers=sendable, timestamp_ms=timestamp_ms
            )
        except Exception as exc:
            raise _translate_produce(exc, topic) from exc
        future.add_callback(lambda _metadata: on_delivery(None))
        future.add_errback(lambda exc: on_delivery(_translate_produce(exc, topic)))

    def poll(self, timeout_s: float) -> None:
        return None

    def flush(self, timeout_s: float) -> bool:
        try:
            self._producer.flush(timeout=timeout_s)
        except kerr.KafkaTimeoutError:
            return False
        return True

    # kafka-python bounds init_transactions by max_block_ms, and waits on the other
    # transactional requests without any bound (a stopped broker blocked them for good): they
    # are run here through its transaction manager and waited on for ``timeout_s`` at most.
    def init_transactions(self, timeout_s: float) -> None:
        _call("initialising transactions", self._producer.init_transactions)

    def begin_transaction(self) -> None:
        _call("beginning a transaction", self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[Partition, int], consumer: Consumer, timeout_s: float
    ) -> None:
        payload = {TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
        metadata = consumer.group_metadata()
        self._transactional(
            "adding offsets to the transaction",
            lambda manager: manager.send_offsets_to_transaction(payload, metadata),
            timeout_s,
        )

    def commit_transaction(self, timeout_s: float) -> None:
        self._transactional("committing the transaction", lambda manager: manager.begin_commit(), timeout_s)

    def abort_transaction(self, timeout_s: float) -> None:
        self._transactional("aborting the transaction", lambda manager: manager.begin_abort(), timeout_s)

    def _transactional(self, action: str, request: Callable[[Any], Any], timeout_s: float) -> None:
        """Start one transactional request and wait ``timeout_s`` at most for its outcome.

        On timeout the request is still under way in the client, so the transaction can only
        be given up: :class:`BrokerUnavailableError`, after which the caller aborts, and a
        failing abort makes it replace the producer (a new one fences this one).
        """
        manager = self._producer._transaction_manager
        if manager is None:
            raise TransportError(f"{action} failed: the producer has no transactional id")
        try:
            result = request(manager)
            self._producer._sender.wakeup()
            finished = result.wait(timeout_ms=max(1, int(timeout_s * 1000)))
        except (kerr.KafkaError, OSError) as exc:
            raise translate(exc, action) from exc
        if not finished:
            raise BrokerUnavailableError(f"{action} did not finish within {timeout_s:.1f} s")

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
