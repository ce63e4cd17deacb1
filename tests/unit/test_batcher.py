"""Micro-batches: due at max size or max wait after the oldest item, in arrival order."""

from __future__ import annotations

from stream_classifier.stream.batcher import MicroBatcher


def test_due_at_max_size() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=3, max_wait_s=10.0)
    for i in range(2):
        batcher.add(i, now=0.0)
    assert not batcher.due(0.0)
    batcher.add(2, now=0.0)
    assert batcher.due(0.0) and batcher.seconds_until_due(0.0) == 0.0
    assert batcher.take() == [0, 1, 2]
    assert len(batcher) == 0 and batcher.seconds_until_due(0.0) is None


def test_due_after_max_wait_from_the_oldest() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_batch_size=10, max_wait_s=0.05)
    batcher.add("a", now=1.0)
    batcher.add("b", now=1.04)
    assert not batcher.due(1.049)
    assert abs((batcher.seconds_until_due(1.02) or 0) - 0.03) < 1e-9
    assert batcher.due(1.05)
    assert batcher.take() == ["a", "b"]


def test_take_returns_at_most_max_size_oldest_first() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=2, max_wait_s=0.0)
    for i in range(5):
        batcher.add(i, now=float(i))
    assert [batcher.take(), batcher.take(), batcher.take()] == [[0, 1], [2, 3], [4]]


def test_zero_wait_is_due_at_once() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=64, max_wait_s=0.0)
    batcher.add(1, now=5.0)
    assert batcher.due(5.0)


def test_drop_keeps_order_of_the_rest() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_s=1.0)
    for i in range(6):
        batcher.add(i, now=float(i))
    assert batcher.drop(lambda item: item % 2 == 0) == 3
    assert batcher.take() == [1, 3, 5]
