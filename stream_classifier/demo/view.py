"""The demo's console view: what it has seen come out of its own run, as lines on a stream."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Tally:
    """What the demo has seen come out, for its own run only."""

    expected: dict[str, str]  # message id -> sample label
    predicted: int = 0
    correct: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    other_outputs: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def done(self) -> int:
        return self.predicted + sum(self.dead_letters.values())


@dataclass(frozen=True)
class Seen:
    """One output of this run: a prediction (label set) or a dead letter (reason set)."""

    key: str
    label: str | None = None
    confidence: float = 0.0
    reason: str | None = None


class Console:
    """Line-oriented, human-readable output on ``out`` (flushed per line, so pipes see it live)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def line(self, text: str = "") -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def step(self, what: str, detail: str) -> None:
        self.line(f"  {what:<10}{detail}")


class LiveView:
    """What comes out of the service for this run: a few predictions, progress, the summary."""

    def __init__(
        self, console: Console, texts: dict[str, str], expected: dict[str, str], show: int = 8
    ) -> None:
        self._console = console
        self._texts = texts
        self.tally = Tally(expected=expected)
        self._show = show
        self._shown = 0
        self._last_progress = 0.0
        self._reported = 0
        self._produced_at = time.monotonic()
        self._last_output_at = self._produced_at

    def start_clock(self) -> None:
        """Mark the moment the messages were sent: throughput counts from here."""
        self._produced_at = self._last_output_at = time.monotonic()

    def record(self, seen: Seen) -> None:
        tally = self.tally
        if seen.reason is not None:
            tally.dead_letters[seen.reason] += 1
            self._console.line(f"  dead letter  {seen.reason:<14} key={seen.key}")
            return
        if seen.key not in tally.expected:
            tally.other_outputs += 1
            self._console.line(f"  [live] {seen.label:<6} p={seen.confidence:.2f}  key={seen.key}")
            return
        self._last_output_at = time.monotonic()
        tally.predicted += 1
        right = seen.label == tally.expected[seen.key]
        tally.correct += int(right)
        if self._shown < self._show:
            self._shown += 1
            mark = "ok  " if right else "MISS"
            text = self._texts.get(seen.key, "")
            self._console.line(f"  [{mark}] {seen.label:<6} p={seen.confidence:.2f}  {text[:72]}")

    def progress(self, *, force: bool = False) -> None:
        now = time.monotonic()
        t = self.tally
        if t.done == self._reported or (not force and now - self._last_progress < 1.0):
            return
        self._last_progress, self._reported = now, t.done
        self._console.line(
            f"  progress  {t.predicted}/{len(t.expected)} classified | {self.throughput():6.1f} msg/s | "
            f"accuracy {t.accuracy:6.1%} | dead letters {sum(t.dead_letters.values())}"
        )

    def throughput(self) -> float:
        """Sample messages classified per second, from sending them to the last output."""
        elapsed = self._last_output_at - self._produced_at
        return self.tally.predicted / elapsed if elapsed > 0 else 0.0

    def summary(self) -> None:
        t = self.tally
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(t.dead_letters.items())) or "none"
        self._console.line()
        self._console.step(
            "result",
            f"{t.predicted}/{len(t.expected)} classified in {self._last_output_at - self._produced_at:.1f} s "
            f"({self.throughput():.1f} msg/s through the broker)",
        )
        self._console.step(
            "", f"accuracy {t.accuracy:.1%} against the sample's labels ({t.correct}/{t.predicted})"
        )
        self._console.step("", f"dead letters {sum(t.dead_letters.values())}: {reasons}")


# --------------------------------------------------------------------------- the parts it runs
