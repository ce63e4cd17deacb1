"""The transport interface: what the service and the learning side see of a Kafka client.

Imports no Kafka client. An implementation (:mod:`.kafka_python`, :mod:`.confluent`):

- returns :class:`Record` objects (topic, partition, offset, key, value, headers, timestamp);
  a header value may be ``None`` (Kafka allows null header values);
- raises :class:`~stream_classifier.errors.BrokerUnavailableError` for failures that may pass
  (the service retries them), :class:`~stream_classifier.errors.RecordRejectedError` for a
  record the broker refuses for good (the service dead-letters its input), and
  :class:`~stream_classifier.errors.TransportError` for failures that will not pass (bad
  credentials, bad client configuration);
- calls a :class:`RebalanceListener` from inside :meth:`Consumer.poll`, on the polling thread
  (kafka-python runs its callbacks on its I/O thread, so there they arrive after the fact:
  ``on_revoked`` may find the partitions already gone, and must not rely on committing them);
- reports each produced record's fate exactly once through its ``on_delivery`` callback, on
  any thread (kafka-python: its I/O thread) — callers must hand the result over safely;
- never auto-commits: offsets move only through :meth:`Consumer.commit`, or through
  :meth:`Producer.send_offsets_to_transaction` for a transactional producer (exactly-once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

Headers = tuple[tuple[str, bytes | None], ...]
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
    def retained(self, revoked: Iterable[Partition]) -> set[Partition]:
        """Of ``revoked`` (inside ``on_revoked``), those this consumer goes on reading from its
        current position once the rebalance is over. kafka-python revokes after the fact: the
        ones given back to it. librdkafka revokes before they go, while :meth:`assignment`
        still lists them, and reads any it gets back from the committed offset: none."""

    def position(self, partition: Partition) -> int: ...
    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]: ...
    def group_metadata(self) -> object:
        """The client's group metadata, for :meth:`Producer.send_offsets_to_transaction`."""

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
        timestamp_ms: int | None = None,
    ) -> None:
        """Queue one record; ``on_delivery`` gets ``None`` once acknowledged, else the error.

        ``timestamp_ms``: the record's CreateTime; None: the time it is produced.
        """

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

    def close(self, timeout_s: float) -> None: ...


class Transport(Protocol):
    def consumer(self, *, read_committed: bool = False) -> Consumer:
        """A group consumer; ``read_committed`` skips records of open and aborted transactions."""

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        """A producer; with ``transactional_id``, a transactional one (exactly-once)."""
