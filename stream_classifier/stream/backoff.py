"""Backoff for failures that may pass: grows on each failure, resets only on a success.

A :class:`Backoff` logs once per change of state (``<name>_unavailable`` when failures begin,
``<name>_available`` when they end), not once per retry. Delays double from ``min_s`` up to
``max_s``; only :meth:`Backoff.ok` resets them, so a failure that repeats keeps backing off.
"""

from __future__ import annotations

import logging

from stream_classifier.ops.logs import log_event

logger = logging.getLogger(__name__)


class Backoff:
    def __init__(self, name: str, *, min_s: float = 0.1, max_s: float = 5.0) -> None:
        self._name = name
        self._min_s = min_s
        self._max_s = max_s
        self.delay_s = 0.0

    @property
    def failing(self) -> bool:
        return self.delay_s > 0

    def failed(self, error: BaseException | str) -> float:
        """Record one failure; returns how long to wait before the next try."""
        if not self.failing:
            log_event(logger, f"{self._name}_unavailable", logging.WARNING, error=str(error))
        self.delay_s = min(self._max_s, max(self._min_s, self.delay_s * 2))
        return self.delay_s

    def ok(self) -> None:
        if self.failing:
            log_event(logger, f"{self._name}_available")
        self.delay_s = 0.0
