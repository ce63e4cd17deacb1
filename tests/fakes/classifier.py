"""A stub of what the serving loop uses of a ModelRuntime: no torch, deterministic, scriptable.

- A text that contains "spam" (any case) is ``spam`` with 0.9, anything else ``ham`` with 0.8.
- ``poison(text)`` true: every call whose texts include that text raises (the text fails alone,
  so the service's one-by-one fallback isolates it).
- ``broken = True``: every call raises ``broken_error`` (default ``RuntimeError``), whatever
  the texts: a systemic failure (a broken model; pass an error class named
  ``OutOfMemoryError`` for CUDA out of memory). Set it back to ``False`` to heal it.
- ``delay_s``: model time per ``infer`` call.
- ``thresholds``: the fitted label -> minimum probability the model carries (empty by default).
- ``probabilities``: when set, a function text -> the row ``infer`` returns for it (in
  ``labels`` order), for tests that need exact probabilities.
- ``hold()`` / ``release()``: ``infer`` blocks until released (``held`` counts the blocked
  calls), to keep batches inside the model while a test scripts something else; a call held
  for more than 30 s raises instead of hanging the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

_HOLD_LIMIT_S = 30.0


@dataclass(frozen=True)
class StubMetadata:
    base_model: str = "stub/base"


@dataclass(frozen=True)
class StubBundle:
    metadata: StubMetadata = field(default_factory=StubMetadata)


class StubPrepared(NamedTuple):
    texts: tuple[str, ...]


class StubClassifier:
    def __init__(
        self,
        version: str = "stub-1",
        *,
        poison: Callable[[str], bool] = lambda text: False,
        delay_s: float = 0.0,
        labels: Sequence[str] = ("ham", "spam"),
        thresholds: Mapping[str, float] | None = None,
        probabilities: Callable[[str], Sequence[float]] | None = None,
    ) -> None:
        self.labels = list(labels)
        self.thresholds: dict[str, float] = dict(thresholds or {})
        self.probabilities = probabilities
        self.version = version
        self.base_model = "stub/base"
        self.bundle = StubBundle()  # what an older loop reads base_model from
        self.device = "cpu"
        self.precision = "fp32"
        self.quantize = "none"
        self.poison = poison
        self.delay_s = delay_s
        self.broken = False
        self.broken_error: type[Exception] = RuntimeError
        self.batch_sizes: list[int] = []  # texts per successful infer call
        self.failures = 0  # calls that raised
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._held = 0

    # ------------------------------------------------------------------ what the service calls

    def prepare(self, texts: Sequence[str]) -> StubPrepared:
        self._check_broken()
        return StubPrepared(tuple(texts))

    def infer(self, prepared: StubPrepared) -> np.ndarray:
        self._wait_open()
        if self.delay_s:
            time.sleep(self.delay_s)
        self._check_broken()
        if any(self.poison(text) for text in prepared.texts):
            self._failed()
            raise ValueError("the stub refuses a poison text")
        with self._lock:
            self.batch_sizes.append(len(prepared.texts))
        if self.probabilities is not None:
            return np.array([self.probabilities(text) for text in prepared.texts], dtype=np.float32)
        spam = np.array(["spam" in text.lower() for text in prepared.texts])
        return np.where(spam[:, None], [0.1, 0.9], [0.8, 0.2]).astype(np.float32).reshape(-1, 2)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.infer(self.prepare(texts))

    # ------------------------------------------------------------------ scripting

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    @property
    def classified(self) -> int:
        with self._lock:
            return sum(self.batch_sizes)

    def _wait_open(self) -> None:
        with self._lock:
            self._held += 1
        try:
            if not self._open.wait(_HOLD_LIMIT_S):
                raise RuntimeError("the stub classifier was held too long")
        finally:
            with self._lock:
                self._held -= 1

    def _check_broken(self) -> None:
        if self.broken:
            self._failed()
            raise self.broken_error("the stub classifier is broken")

    def _failed(self) -> None:
        with self._lock:
            self.failures += 1
