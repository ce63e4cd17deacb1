"""An in-memory Kafka for the serving loop's unit tier: :class:`FakeTransport` over a :class:`FakeBroker`.

It keeps the contract of :mod:`stream_classifier.transport.base`:

- **Group.** One consumer group. A consumer joins at its first ``poll`` and is given every
  partition of its topics; rebalances reach the listener from inside ``poll``, in
  kafka-python's order: the assignment changes first, then the listener is told. A partition
  revoked and re-assigned in one rebalance keeps its fetch position (as kafka-python does); a
  newly assigned one starts at the committed offset (else 0). Offsets move only by ``commit``
  or by a committed transaction.
- **Reads.** ``poll`` honours pause/resume/seek and ``max_records`` and waits up to its
  timeout for data. A ``read_committed`` consumer skips records of aborted transactions and
  stops at the first record of an open one (the last stable offset).
- **Produce.** ``send`` appends to the topic's log at once (a new topic gets 1 partition) and
  reports the record's fate exactly once, from the producer's ``poll``/``flush`` on the
  caller's thread (as librdkafka does), or, after :meth:`FakeTransport.hold_acks`, when the
  test releases it (optionally on the test's own thread, like kafka-python's I/O thread).
  A record over ``max_request_size`` raises :class:`RecordRejectedError` at ``send`` (both
  real clients refuse it there).

Scripting, thread-safe while the service runs:

- ``transport.fail(method, times=1, error=None)``: the next ``times`` calls of a client method
  raise ``error`` (default :class:`BrokerUnavailableError`): "poll", "commit", "seek",
  "end_offsets", "send", "flush", "init_transactions", "begin_transaction",
  "send_offsets_to_transaction", "commit_transaction", "abort_transaction", and "consumer" /
  "producer" (creating a client);
- ``transport.fail_sends(error, when=..., times=1, at="callback" | "send")``: the sends that
  match ``when(sent)`` fail, through their callback (the record is not written) or by raising;
  rules are tried in the order given, so several calls make a queue;
- ``transport.hold_acks()`` / ``transport.release_acks(out_of_band=False)``;
- ``transport.rebalance(revoke=..., assign=..., lost=...)``: applied at the next poll;
- ``broker.corrupt(topic, partition, offset)``: polls that reach it raise
  :class:`UnreadableRecordError` until the consumer seeks past it.
"""

from __future__ import annotations

import itertools
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from stream_classifier.errors import (
    BrokerUnavailableError,
    RecordRejectedError,
    TransportError,
    UnreadableRecordError,
)
from stream_classifier.transport.base import DeliveryCallback, Headers, Partition, RebalanceListener, Record

Failure = BaseException | type[BaseException]


class Sent(NamedTuple):
    """A record as handed to ``send``: what :meth:`FakeTransport.fail_sends` predicates see."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers

    def header(self, name: str) -> bytes | None:
        return dict(self.headers).get(name)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """The size a producer checks against ``max_request_size`` (batch header + record, varints ~1 B)."""
    return (
        61
        + 21
        + len(key or b"")
        + len(value or b"")
        + sum(len(name.encode("utf-8", "replace")) + len(data or b"") + 2 for name, data in headers)
    )


@dataclass(eq=False)
class _Txn:
    state: Literal["open", "committed", "aborted"] = "open"
    offsets: dict[Partition, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Entry:
    record: Record
    txn: _Txn | None


def _error(error: Failure, message: str) -> BaseException:
    return error(message) if isinstance(error, type) else error


class FakeBroker:
    """Topics of append-only partition logs, and one consumer group's committed offsets."""

    def __init__(self) -> None:
        self.lock = threading.Condition(threading.RLock())  # guards the broker and every client
        self._logs: dict[str, list[list[_Entry]]] = {}
        self._committed: dict[Partition, int] = {}
        self.commit_history: list[dict[Partition, int]] = []
        self._corrupt: set[tuple[str, int, int]] = set()
        self.generation = 0
        self._round_robin = itertools.count()

    def create_topic(self, topic: str, partitions: int = 1) -> list[Partition]:
        with self.lock:
            self._logs.setdefault(topic, [[] for _ in range(partitions)])
            return self.partitions(topic)

    def partitions(self, topic: str) -> list[Partition]:
        with self.lock:
            return [Partition(topic, p) for p in range(len(self._logs.get(topic, ())))]

    def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Record:
        """Write one record outside any transaction (the tests' own producer)."""
        return self._append(
            topic, key, value, tuple(headers), None, partition=partition, timestamp_ms=timestamp_ms
        )

    def corrupt(self, topic: str, partition: int, offset: int) -> None:
        """Consumers cannot parse this record: polls reaching it raise until they seek past it."""
        with self.lock:
            self._corrupt.add((topic, partition, offset))

    def records(self, topic: str, *, read_committed: bool = True) -> list[Record]:
        """The readable records of ``topic``, partition by partition, in offset order."""
        with self.lock:
            return [
                entry.record
                for log in self._logs.get(topic, ())
                for entry in log
                if not read_committed or entry.txn is None or entry.txn.state == "committed"
            ]

    def committed(self) -> dict[Partition, int]:
        with self.lock:
            return dict(self._committed)

    def end_offsets(self, topic: str) -> dict[Partition, int]:
        with self.lock:
            return {Partition(topic, p): len(log) for p, log in enumerate(self._logs.get(topic, ()))}

    # ------------------------------------------------------------------ for the clients

    def _append(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        txn: _Txn | None,
        *,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Record:
        with self.lock:
            logs = self._logs.setdefault(topic, [[]])  # auto-created with one partition
            if partition is None:
                hashed = zlib.crc32(key) if key is not None else next(self._round_robin)
                partition = hashed % len(logs)
            log = logs[partition]
            stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
            record = Record(topic, partition, len(log), key, value, headers, stamp)
            log.append(_Entry(record, txn))
            self.lock.notify_all()
            return record

    def _log(self, tp: Partition) -> list[_Entry]:
        return self._logs[tp.topic][tp.partition]

    def _stable_end(self, tp: Partition) -> int:
        log = self._log(tp)
        return next((e.record.offset for e in log if e.txn is not None and e.txn.state == "open"), len(log))

    def _commit(self, offsets: Mapping[Partition, int]) -> None:
        with self.lock:
            self._committed.update(offsets)
            self.commit_history.append(dict(offsets))
            self.lock.notify_all()


@dataclass(eq=False)
class _SendRule:
    error: Failure
    when: Callable[[Sent], bool]
    remaining: int | None
    at: Literal["callback", "send"]


@dataclass(frozen=True, slots=True)
class _Ack:
    producer: FakeProducer
    callback: DeliveryCallback
    error: BaseException | None


class FakeTransport:
    """The :class:`~stream_classifier.transport.base.Transport` of the unit tier, and its script."""

    def __init__(self, broker: FakeBroker | None = None, *, max_request_size: int = 1_048_576) -> None:
        self.broker = broker or FakeBroker()
        self.max_request_size = max_request_size
        self.consumers: list[FakeConsumer] = []
        self.producers: list[FakeProducer] = []
        self.calls: Counter[str] = Counter()  # client calls made, by method name
        self.poll_times: list[float] = []  # time.monotonic() at the start of every poll
        self.max_uncommitted = 0  # the most records consumed and not committed, after any poll
        self._lock = self.broker.lock
        self._failures: dict[str, deque[Failure]] = {}
        self._send_rules: list[_SendRule] = []
        self._rebalances: deque[list[tuple[str, list[Partition]]]] = deque()
        self._acks: list[_Ack] = []
        self._held: list[_Ack] = []
        self._holding = False

    # ------------------------------------------------------------------ the Transport protocol

    def consumer(self, *, read_committed: bool = False) -> FakeConsumer:
        self._enter("consumer")
        with self._lock:
            consumer = FakeConsumer(self, read_committed=read_committed)
            self.consumers.append(consumer)
            return consumer

    def producer(self, *, transactional_id: str | None = None) -> FakeProducer:
        self._enter("producer")
        with self._lock:
            producer = FakeProducer(self, transactional_id)
            self.producers.append(producer)
            return producer

    # ------------------------------------------------------------------ scripting

    def fail(self, method: str, times: int = 1, error: Failure | None = None) -> None:
        """Make the next ``times`` calls of ``method`` raise ``error`` (default: transient)."""
        with self._lock:
            self._failures.setdefault(method, deque()).extend([error or BrokerUnavailableError] * times)

    def fail_sends(
        self,
        error: Failure,
        *,
        when: Callable[[Sent], bool] = lambda sent: True,
        times: int | None = 1,
        at: Literal["callback", "send"] = "callback",
    ) -> None:
        """Fail the next ``times`` sends (``None``: all) matching ``when``, by callback or by raising."""
        with self._lock:
            self._send_rules.append(_SendRule(error, when, times, at))

    def rebalance(
        self,
        *,
        revoke: Iterable[Partition] = (),
        lost: Iterable[Partition] = (),
        assign: Iterable[Partition] = (),
    ) -> None:
        """At the next poll: revoke, then lose, then assign these partitions (one rebalance)."""
        events = [("revoked", list(revoke)), ("lost", list(lost)), ("assigned", list(assign))]
        with self._lock:
            self._rebalances.append([(kind, parts) for kind, parts in events if parts])
            self._lock.notify_all()

    def hold_acks(self) -> None:
        """Keep every later delivery report back until :meth:`release_acks`."""
        with self._lock:
            self._holding = True

    def release_acks(self, *, out_of_band: bool = False) -> None:
        """Deliver the held reports: by the producers' next poll/flush, or now, on this thread."""
        with self._lock:
            self._holding = False
            held, self._held = self._held, []
            if not out_of_band:
                self._acks.extend(held)
            self._lock.notify_all()
        if out_of_band:
            for ack in held:
                ack.callback(ack.error)

    # ------------------------------------------------------------------ observing

    def scripted(self, method: str) -> int:
        """How many scripted failures of ``method`` are still to come."""
        with self._lock:
            return len(self._failures.get(method, ()))

    @property
    def held_acks(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def last_consumer(self) -> FakeConsumer:
        with self._lock:
            return self.consumers[-1]

    def max_poll_gap(self, *, until_now: bool = False) -> float:
        """The longest time between the starts of two polls (or from the last one until now)."""
        with self._lock:
            times = [*self.poll_times, time.monotonic()] if until_now else list(self.poll_times)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    # ------------------------------------------------------------------ for the clients

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1
            queued = self._failures.get(method)
            error = queued.popleft() if queued else None
        if error is not None:
            raise _error(error, f"scripted failure of {method}")

    def _send_rule(self, sent: Sent) -> _SendRule | None:
        for rule in self._send_rules:
            if rule.remaining != 0 and rule.when(sent):
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule
        return None

    def _report(
        self, producer: FakeProducer, callback: DeliveryCallback, error: BaseException | None
    ) -> None:
        ack = _Ack(producer, callback, error)
        (self._held if self._holding else self._acks).append(ack)

    def _deliver(self, producer: FakeProducer, error: BaseException | None = None) -> None:
        """Call ``producer``'s ready delivery callbacks (with ``error`` instead, if given)."""
        with self._lock:
            ready = [ack for ack in self._acks if ack.producer is producer]
            self._acks = [ack for ack in self._acks if ack.producer is not producer]
        for ack in ready:
            ack.callback(error if error is not None else ack.error)


class FakeConsumer:
    def __init__(self, transport: FakeTransport, *, read_committed: bool) -> None:
        self.read_committed = read_committed
        self.closed = False
        self._transport = transport
        self._broker = transport.broker
        self._lock = transport.broker.lock
        self._topics: list[str] = []
        self._listener: RebalanceListener | None = None
        self._assigned: set[Partition] = set()
        self._positions: dict[Partition, int] = {}
        self._paused: set[Partition] = set()
        self._generation: int | None = None
        self._polls = 0

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._check("subscribe")
        self._topics, self._listener = list(topics), listener

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        with self._lock:
            self._transport.poll_times.append(time.monotonic())
        self._check("poll")
        deadline = time.monotonic() + timeout_s
        self._rebalance()
        with self._lock:
            self._polls += 1
            while True:
                records = self._fetch(max_records)
                remaining = deadline - time.monotonic()
                if records or remaining <= 0 or self._transport._rebalances:
                    break
                self._lock.wait(remaining)
            committed = self._broker._committed
            uncommitted = sum(self._positions[tp] - committed.get(tp, 0) for tp in self._assigned)
            self._transport.max_uncommitted = max(self._transport.max_uncommitted, uncommitted)
            return records

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self._check("commit")
        self._broker._commit(offsets)

    def seek(self, partition: Partition, offset: int) -> None:
        self._check("seek")
        with self._lock:
            self._held(partition, "seek")
            self._positions[partition] = offset

    def pause(self, partitions: Iterable[Partition]) -> None:
        with self._lock:
            for tp in partitions:
                self._held(tp, "pause")
                self._paused.add(tp)

    def resume(self, partitions: Iterable[Partition]) -> None:
        with self._lock:
            for tp in partitions:
                self._held(tp, "resume")
                self._paused.discard(tp)

    def assignment(self) -> set[Partition]:
        with self._lock:
            return set(self._assigned)

    def retained(self, revoked: Iterable[Partition]) -> set[Partition]:
        # Callbacks run after the rebalance (as kafka-python's): the assignment is the new one.
        return set(revoked) & self.assignment()

    def paused(self) -> set[Partition]:
        """Not in the protocol: the paused partitions, for tests."""
        with self._lock:
            return set(self._paused)

    def position(self, partition: Partition) -> int:
        with self._lock:
            self._held(partition, "position")
            return self._positions[partition]

    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        self._check("end_offsets")
        with self._lock:
            if self.read_committed:
                return {tp: self._broker._stable_end(tp) for tp in partitions}
            return {tp: len(self._broker._log(tp)) for tp in partitions}

    def group_metadata(self) -> object:
        with self._lock:
            return ("group", self._generation)

    def close(self) -> None:
        """Leave the group: no revocation reaches the listener (no poll serves it any more)."""
        self._check("close")
        with self._lock:
            self.closed = True
            self._assigned.clear()
            self._broker.generation += 1

    # ------------------------------------------------------------------ internals

    def _check(self, method: str) -> None:
        if self.closed:
            raise TransportError(f"{method} on a closed consumer")
        self._transport._enter(method)

    def _held(self, tp: Partition, action: str) -> None:
        if tp not in self._assigned:  # kafka-python: IllegalStateError, a TransportError
            raise TransportError(f"{action} of {tp}, which is not assigned to this consumer")

    def _rebalance(self) -> None:
        """Apply the join and any scripted rebalance, then tell the listener (kafka-python's order)."""
        with self._lock:
            events: list[tuple[str, list[Partition]]] = []
            if self._generation is None:
                events.append(("assigned", [tp for t in self._topics for tp in self._broker.partitions(t)]))
            if self._transport._rebalances:
                events += self._transport._rebalances.popleft()
            if not events:
                return
            kept: dict[Partition, int] = {}
            for kind, partitions in events:
                for tp in partitions:
                    if kind == "assigned":
                        self._assigned.add(tp)
                        self._paused.discard(tp)
                        self._positions[tp] = kept.pop(tp, self._broker._committed.get(tp, 0))
                    elif tp in self._assigned:
                        self._assigned.discard(tp)
                        self._paused.discard(tp)
                        position = self._positions.pop(tp)
                        if kind == "revoked":
                            kept[tp] = position
            self._broker.generation += 1
            self._generation = self._broker.generation
        assert self._listener is not None, "poll before subscribe"
        for kind, partitions in events:
            getattr(self._listener, f"on_{kind}")(sorted(partitions))

    def _fetch(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        readable = sorted(self._assigned - self._paused)
        start = self._polls % len(readable) if readable else 0
        for tp in readable[start:] + readable[:start]:  # a different partition first on each poll
            log, position = self._broker._log(tp), self._positions[tp]
            while len(out) < max_records and position < len(log):
                if (tp.topic, tp.partition, position) in self._broker._corrupt:
                    self._positions[tp] = position
                    if out:
                        return out
                    raise UnreadableRecordError(
                        f"cannot parse the record at {tp.topic}:{tp.partition}:{position}",
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=position,
                    )
                entry = log[position]
                if self.read_committed and entry.txn is not None and entry.txn.state != "committed":
                    if entry.txn.state == "open":
                        break  # the last stable offset
                    position += 1  # aborted: skipped
                    continue
                out.append(entry.record)
                position += 1
            self._positions[tp] = position
        return out


class FakeProducer:
    def __init__(self, transport: FakeTransport, transactional_id: str | None) -> None:
        self.transactional_id = transactional_id
        self.closed = False
        self.fenced = False
        self._transport = transport
        self._broker = transport.broker
        self._lock = transport.broker.lock
        self._initialised = False
        self._txn: _Txn | None = None

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
        self._check("send")
        transport = self._transport
        size = record_size(key, value, headers)
        if size > transport.max_request_size:
            raise RecordRejectedError(
                f"the record is {size} bytes, over max_request_size {transport.max_request_size}"
            )
        with self._lock:
            if self.transactional_id is not None and self._txn is None:
                raise TransportError("send outside a transaction on a transactional producer")
            rule = transport._send_rule(Sent(topic, key, value, tuple(headers)))
            if rule is not None and rule.at == "send":
                raise _error(rule.error, f"scripted send failure ({topic})")
            if rule is None:
                self._broker._append(topic, key, value, tuple(headers), self._txn, timestamp_ms=timestamp_ms)
            error = None if rule is None else _error(rule.error, f"scripted delivery failure ({topic})")
            transport._report(self, on_delivery, error)

    def poll(self, timeout_s: float) -> None:
        self._transport._deliver(self)

    def flush(self, timeout_s: float) -> bool:
        self._check("flush")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._held() and (remaining := deadline - time.monotonic()) > 0:
                self._lock.wait(remaining)
            done = not self._held()
        self._transport._deliver(self)
        return done

    def init_transactions(self, timeout_s: float) -> None:
        self._check("init_transactions")
        with self._lock:
            for other in self._transport.producers:
                if other is not self and other.transactional_id == self.transactional_id:
                    other.fenced = True
                    if other._txn is not None:
                        other._txn.state = "aborted"
            self._initialised = True

    def begin_transaction(self) -> None:
        self._check("begin_transaction")
        with self._lock:
            if not self._initialised or self._txn is not None:
                raise TransportError("begin_transaction before init_transactions or inside a transaction")
            self._txn = _Txn()

    def send_offsets_to_transaction(
        self, offsets: Mapping[Partition, int], consumer: object, timeout_s: float
    ) -> None:
        self._check("send_offsets_to_transaction")
        with self._lock:
            txn = self._open_txn()
            if consumer.group_metadata() != ("group", self._broker.generation):  # type: ignore[attr-defined]
                raise BrokerUnavailableError("the group has rebalanced since (stale group metadata)")
            txn.offsets.update(offsets)

    def commit_transaction(self, timeout_s: float) -> None:
        self._check("commit_transaction")
        self._transport._deliver(self)  # a commit flushes first
        with self._lock:
            txn = self._open_txn()
            txn.state = "committed"
            self._txn = None
            self._broker._commit(txn.offsets)

    def abort_transaction(self, timeout_s: float) -> None:
        self._check("abort_transaction")
        with self._lock:
            txn = self._open_txn()
            txn.state = "aborted"
            self._txn = None
            self._lock.notify_all()
        self._transport._deliver(self, BrokerUnavailableError("the transaction was aborted"))

    def close(self, timeout_s: float) -> None:
        """Deliver what is ready; an open transaction is aborted (the broker's timeout, at once)."""
        self._transport._deliver(self)
        with self._lock:
            self.closed = True
            if self._txn is not None:
                self._txn.state = "aborted"
                self._txn = None
            self._lock.notify_all()

    def _check(self, method: str) -> None:
        if self.closed or self.fenced:
            raise TransportError(f"{method} on a {'closed' if self.closed else 'fenced'} producer")
        self._transport._enter(method)

    def _held(self) -> bool:
        return any(ack.producer is self for ack in self._transport._held)

    def _open_txn(self) -> _Txn:
        if self._txn is None:
            raise TransportError("no open transaction")
        return self._txn
