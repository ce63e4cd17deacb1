"""Which consumed offsets may be committed.

Invariant (at-least-once): the committable offset of a partition is one past the longest
run of messages, from the oldest uncommitted one, whose records (outputs, dead letters,
extra records) were all sent *and* acknowledged. A message still in the batcher or the
model, or with a record awaiting its acknowledgement, holds back the commit of itself and of
every later message in its partition.

When a partition is revoked, its state is dropped; when it is rewound (re-read from its
oldest pending message), its pending messages are dropped but its commit point is kept, so
the acknowledged prefix is still committed. Either way the dropped messages become *stale*
(:meth:`OffsetTracker.is_current` is false), their late acknowledgements are ignored, and
they are read again, so nothing is lost.

Not thread-safe: the service calls it from its I/O thread only.
"""

from __future__ import annotations

from collections import deque

from stream_classifier.transport.base import Partition


class Pending:
    """One consumed message until its partition's commit passes it."""

    __slots__ = ("_remaining", "_sealed", "offset", "owner")

    def __init__(self, owner: PartitionOffsets, offset: int) -> None:
        self.owner = owner
        self.offset = offset
        self._remaining = 0
        self._sealed = False

    def sent(self) -> None:
        """One more record was handed to the producer for this message."""
        self._remaining += 1

    def seal(self) -> None:
        """Every record for this message has been sent."""
        self._sealed = True

    def acknowledged(self) -> None:
        self._remaining -= 1

    @property
    def done(self) -> bool:
        return self._sealed and self._remaining == 0


class PartitionOffsets:
    """The pending messages of one partition, oldest first."""

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.pending: deque[Pending] = deque()
        self.committable: int | None = None
        self.committed: int | None = None
        self.start: int | None = None  # the first offset tracked since the state was created
        self.done: deque[int] = deque()  # offsets of finished messages not yet committed

    def advance(self) -> None:
        while self.pending and self.pending[0].done:
            offset = self.pending.popleft().offset
            self.done.append(offset)
            self.committable = offset + 1

    def passed(self, offset: int) -> None:
        """The commit reached ``offset``: the finished messages before it stop counting."""
        self.committed = offset
        while self.done and self.done[0] < offset:
            self.done.popleft()


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Partition, PartitionOffsets] = {}

    def track(self, partition: Partition, offset: int) -> Pending:
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = PartitionOffsets(partition)
        if state.start is None:
            state.start = offset
        entry = Pending(state, offset)
        state.pending.append(entry)
        return entry

    def is_current(self, entry: Pending) -> bool:
        return self._partitions.get(entry.owner.partition) is entry.owner

    def settle(self, entry: Pending) -> None:
        """Re-check ``entry``'s partition after it was sealed or acknowledged."""
        if self.is_current(entry):
            entry.owner.advance()

    def to_commit(self) -> dict[Partition, int]:
        """Offsets that moved past the last commit."""
        return {
            tp: state.committable
            for tp, state in self._partitions.items()
            if state.committable is not None and state.committable != state.committed
        }

    def committed(self, offsets: dict[Partition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.passed(offset)

    def resume_point(self, partition: Partition) -> int | None:
        """Where to re-read ``partition`` from to lose nothing: its oldest pending offset."""
        state = self._partitions.get(partition)
        if state is None or not state.pending:
            return None
        return state.pending[0].offset

    def restart_point(self, partition: Partition) -> int | None:
        """Where to re-read ``partition`` from to undo everything not committed by this tracker.

        The last offset committed through :meth:`committed`, else the first one tracked; None
        for a partition without state. Exact as long as the state was created when reading
        began at the committed offset (on assign, after a commit, after a reconnect).
        """
        state = self._partitions.get(partition)
        if state is None:
            return None
        return state.committed if state.committed is not None else state.start

    def drop(self, partitions: set[Partition]) -> int:
        """Forget ``partitions``; their pending messages become stale. Returns how many."""
        dropped = 0
        for tp in partitions:
            state = self._partitions.pop(tp, None)
            if state is not None:
                dropped += len(state.pending)
        return dropped

    def rewind(self, partition: Partition) -> int | None:
        """Drop ``partition``'s pending messages, keeping its commit point; returns where to re-read.

        Returns None (and changes nothing) when nothing is pending.
        """
        state = self._partitions.get(partition)
        if state is None or not state.pending:
            return None
        resume = state.pending[0].offset
        fresh = self._partitions[partition] = PartitionOffsets(partition)
        fresh.committable, fresh.committed, fresh.start = state.committable, state.committed, state.start
        fresh.done = state.done
        return resume

    def partitions(self) -> list[Partition]:
        return list(self._partitions)

    def unsettled(self) -> int:
        """Messages whose records are not all sent and acknowledged yet."""
        return sum(len(state.pending) for state in list(self._partitions.values()))

    def in_flight(self) -> int:
        """Messages consumed and not yet committed: pending ones and finished ones the commit
        has not passed. This is what backpressure bounds, so a crash re-reads at most it."""
        # list() copies atomically, so other threads may read this while the I/O thread runs.
        return sum(len(state.pending) + len(state.done) for state in list(self._partitions.values()))
