"""Size- and time-bounded micro-batches.

A batch is due when ``max_batch_size`` items wait, or ``max_wait_s`` after its oldest item
arrived, whichever comes first. Items leave in arrival order. The batcher holds whatever it
is given; the caller bounds it (the service pauses consumption above ``max_in_flight``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_batch_size: int, max_wait_s: float) -> None:
        self._max_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._items: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float) -> None:
        """Queue ``item``, which arrived at monotonic time ``now``."""
        self._items.append((now, item))

    def due(self, now: float) -> bool:
        """Whether a batch should be taken now."""
        if not self._items:
            return False
        return len(self._items) >= self._max_size or now - self._items[0][0] >= self._max_wait_s

    def seconds_until_due(self, now: float) -> float | None:
        """Time until :meth:`due` turns true with no new items; None when empty."""
        if not self._items:
            return None
        if len(self._items) >= self._max_size:
            return 0.0
        return max(0.0, self._items[0][0] + self._max_wait_s - now)

    def take(self) -> list[T]:
        """Remove and return up to ``max_batch_size`` of the oldest items."""
        n = min(self._max_size, len(self._items))
        return [self._items.popleft()[1] for _ in range(n)]

    def drop(self, predicate: Callable[[T], bool]) -> int:
        """Remove the items for which ``predicate`` is true (keeping order); return how many."""
        kept = deque(entry for entry in self._items if not predicate(entry[1]))
        dropped = len(self._items) - len(kept)
        self._items = kept
        return dropped
