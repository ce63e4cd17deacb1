"""Commit points: one past the acknowledged prefix of each partition; stale work ignored."""

from __future__ import annotations

from stream_classifier.stream.offsets import OffsetTracker
from stream_classifier.transport import Partition

P0 = Partition("in", 0)
P1 = Partition("in", 1)


def test_commit_waits_for_the_oldest_message() -> None:
    tracker = OffsetTracker()
    entries = [tracker.track(P0, offset) for offset in (10, 11, 12)]
    for entry in entries:
        entry.sent()
    for entry in entries[1:]:  # later messages acknowledged first
        entry.seal()
        entry.acknowledged()
        tracker.settle(entry)
    assert tracker.to_commit() == {}
    entries[0].seal()
    tracker.settle(entries[0])  # sealed, but its record is not acknowledged yet
    assert tracker.to_commit() == {}
    entries[0].acknowledged()
    tracker.settle(entries[0])
    assert tracker.to_commit() == {P0: 13}
    tracker.committed({P0: 13})
    assert tracker.to_commit() == {} and tracker.in_flight() == 0


def test_a_message_with_several_records_needs_them_all() -> None:
    tracker = OffsetTracker()
    entry = tracker.track(P0, 0)
    entry.sent()
    entry.sent()
    entry.seal()
    entry.acknowledged()
    tracker.settle(entry)
    assert tracker.to_commit() == {}
    entry.acknowledged()
    tracker.settle(entry)
    assert tracker.to_commit() == {P0: 1}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    for tp in (P0, P1):
        entry = tracker.track(tp, 5)
        entry.seal()
        tracker.settle(entry)
    assert tracker.to_commit() == {P0: 6, P1: 6}


def test_dropped_partition_makes_its_work_stale() -> None:
    tracker = OffsetTracker()
    old = tracker.track(P0, 3)
    assert tracker.resume_point(P0) == 3
    assert tracker.drop({P0}) == 1
    assert not tracker.is_current(old)
    fresh = tracker.track(P0, 3)
    old.seal()
    tracker.settle(old)
    assert tracker.to_commit() == {}
    assert tracker.is_current(fresh) and tracker.in_flight() == 1
