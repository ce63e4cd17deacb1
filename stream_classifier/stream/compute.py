"""The compute worker: the only caller of ``infer``, and the one place a model is swapped.

Invariants:

- **One compute thread** runs :meth:`Classifier.infer`; the I/O thread prepares batches
  (tokenises) and hands them over through a queue of at most ``depth`` batches, and reads
  results back in the order the batches went in.
- **The model reference.** :meth:`ComputeWorker.swap` only records the incoming model; the
  compute thread applies it between batches, so each batch is computed, and each output
  named, by exactly one version.
- **A bad message is not a broken runtime.** When a batch fails, its messages are run one
  by one: those that fail alone are the messages' fault (``failed``). When every message
  fails and a known-good canary text fails too, or the failure is out of memory, or the
  model returns no finite probability at all, the runtime is at fault: the result is marked
  ``broken`` and no message is blamed for it.
- **A failed device is fatal.** :class:`~stream_classifier.errors.DeviceFailedError` (a
  device-side CUDA error: the context is unusable) is raised to the I/O thread, which stops
  the service non-zero; every later batch gets the same error without touching the model.
- **Failures are handled outside their ``except`` clause.** A failure is reduced to its
  description before anything else runs (the one-by-one retries, the canary), so its
  traceback, and the failed pass's frames and device memory, are freed first.
- **Nothing keeps a swapped-out model alive.** Once its last batch is done, the worker holds
  no job, result or reference to it (tested with the garbage collector off).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from stream_classifier.errors import DeviceFailedError
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.classifier import Classifier, decided_by

logger = logging.getLogger(__name__)

T = TypeVar("T")
_V = TypeVar("_V")
_CANARY_TEXT = "hello"
_REASON_CHARS = 200


@dataclass(slots=True)
class Job(Generic[T]):
    items: list[T]
    texts: list[str]
    classifier: Classifier
    prepared: Any | None


@dataclass(slots=True)
class Result(Generic[T]):
    """A batch's outcome: probabilities in input order, or ``broken`` with the runtime's error."""

    items: list[T]
    classifier: Classifier
    probabilities: np.ndarray
    failed: dict[int, str] = field(default_factory=dict)  # index -> why that message failed alone
    broken: str | None = None
    # Per row, the model that decided it (a cascade's runtime says; None: the runtime alone).
    # A failed row's entry is "" (it is never published).
    decided_by: Sequence[str] | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or device memory ran out (torch's ``OutOfMemoryError`` is matched by name)."""
    return isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:_REASON_CHARS]}"


@dataclass(frozen=True, slots=True)
class _Failure:
    """What is kept of a failed model call: its description, never the exception itself."""

    reason: str
    out_of_memory: bool


def _attempt(work: Callable[[], _V]) -> _V | _Failure:
    """``work()``, or its failure's description; a failed device propagates.

    Returning from here drops the exception, its traceback and the frames it holds.
    """
    try:
        return work()
    except DeviceFailedError:
        raise
    except Exception as exc:
        return _Failure(_describe(exc), is_out_of_memory(exc))


class ComputeWorker(Generic[T]):
    """Runs batches on its own thread; see the module docstring for the invariants."""

    def __init__(
        self,
        classifier: Classifier,
        metrics: Metrics,
        *,
        depth: int,
        on_swap: Callable[[Classifier, Classifier], None] | None = None,
    ) -> None:
        self._classifier = classifier
        self._incoming: Classifier | None = None
        self._swap_lock = threading.Lock()
        self._metrics = metrics
        self._depth = depth
        self._jobs: queue.Queue[Job[T] | None] = queue.Queue(maxsize=depth)
        self._results: queue.SimpleQueue[Result[T] | BaseException] = queue.SimpleQueue()
        self.outstanding = 0  # batches submitted and not yet taken back (the I/O thread's count)
        self._thread = threading.Thread(target=self._loop, name="stream-compute", daemon=True)
        self._on_swap = on_swap  # called with (old, new) on the compute thread, after a swap
        self._device_failed: DeviceFailedError | None = None  # set once; every later job gets it

    @property
    def classifier(self) -> Classifier:
        """The model the next batch will be prepared for (it may be swapped before it runs)."""
        return self._classifier

    @property
    def full(self) -> bool:
        return self.outstanding >= self._depth

    def start(self) -> None:
        self._thread.start()

    def swap(self, classifier: Classifier) -> None:
        """Serve ``classifier`` from the next batch on (thread-safe)."""
        with self._swap_lock:
            self._incoming = classifier

    def submit(self, items: list[T], texts: list[str]) -> None:
        """Prepare ``texts`` on the caller's thread and queue the batch (I/O thread only)."""
        classifier = self._classifier
        try:
            prepared: Any | None = classifier.prepare(texts)
        except Exception as exc:  # run one by one on the compute thread, which isolates the culprit
            log_event(logger, "prepare_failed", logging.WARNING, error=repr(exc), batch=len(items))
            prepared = None
        self._jobs.put(Job(items, texts, classifier, prepared))
        self.outstanding += 1

    def take(self, *, block: bool, timeout_s: float = 0.0) -> Result[T] | None:
        """The next result in submission order, or None when none came in time.

        Raises what the compute thread raised outside a model call (a bug, not a message).
        """
        if not self.outstanding:
            return None
        try:
            result = (
                self._results.get(block=block, timeout=timeout_s) if block else self._results.get_nowait()
            )
        except queue.Empty:
            return None
        self.outstanding -= 1
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self, timeout_s: float) -> None:
        try:
            self._jobs.put(None, timeout=max(0.0, timeout_s))
        except queue.Full:
            return
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, timeout_s))

    # ------------------------------------------------------------------ compute thread

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._device_failed is not None:
                    raise self._device_failed
                self._results.put(self._run(job))
            except DeviceFailedError as exc:
                if self._device_failed is None:
                    log_event(logger, "device_failed", logging.CRITICAL, error=_describe(exc))
                self._device_failed = exc
                self._results.put(exc)
            except BaseException as exc:  # a bug: hand it to the I/O thread, which raises it
                self._results.put(exc)
            # While waiting for the next job, hold nothing of this one (its model may be swapped out).
            del job

    def _current(self) -> Classifier:
        with self._swap_lock:
            incoming, self._incoming = self._incoming, None
        if incoming is not None and incoming is not self._classifier:
            old, self._classifier = self._classifier, incoming
            if self._on_swap is not None:
                self._on_swap(old, incoming)
        return self._classifier

    def _run(self, job: Job[T]) -> Result[T]:
        classifier = self._current()
        texts = job.texts
        started = time.perf_counter()
        prepared = job.prepared if job.classifier is classifier and job.prepared is not None else None
        outcome = _attempt(
            lambda: classifier.infer(prepared if prepared is not None else classifier.prepare(texts))
        )
        if not isinstance(outcome, _Failure):
            result = Result(job.items, classifier, outcome, decided_by=decided_by(outcome, len(texts)))
        elif outcome.out_of_memory:
            result = self._broken(job, classifier, outcome.reason)
        else:
            log_event(
                logger, "batch_inference_failed", logging.WARNING, error=outcome.reason, batch=len(texts)
            )
            result = self._one_by_one(job, classifier)
        if result.broken is None:
            result = self._checked(result)
        self._metrics.inference_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(texts))
        return result

    def _one_by_one(self, job: Job[T], classifier: Classifier) -> Result[T]:
        """Isolate the messages that fail alone; the others get their probabilities."""
        probabilities = np.zeros((len(job.texts), len(classifier.labels)), dtype=np.float32)
        failed: dict[int, str] = {}
        deciders = [""] * len(job.texts)
        said = False
        for index, text in enumerate(job.texts):
            outcome = _attempt(functools.partial(classifier.predict_proba, [text]))
            if not isinstance(outcome, _Failure):
                probabilities[index] = outcome[0]
                names = decided_by(outcome, 1)
                if names is not None:
                    deciders[index], said = names[0], True
            elif outcome.out_of_memory:
                return self._broken(job, classifier, outcome.reason)
            else:
                failed[index] = f"inference failed: {outcome.reason}"
        if len(failed) == len(job.texts):
            canary = self._canary_error(classifier)
            if canary is not None:
                return self._broken(job, classifier, canary)
        return Result(job.items, classifier, probabilities, failed, decided_by=deciders if said else None)

    def _checked(self, result: Result[T]) -> Result[T]:
        """Never publish a non-finite probability: such rows fail, and a model giving only those is broken."""
        finite = np.isfinite(result.probabilities).all(axis=1)
        if finite.all():
            return result
        bad = [int(i) for i in np.flatnonzero(~finite) if int(i) not in result.failed]
        if len(bad) + len(result.failed) == len(result.items) and self._canary_error(result.classifier):
            return self._broken_result(
                result.items, result.classifier, "the model returns non-finite probabilities"
            )
        failed = dict(result.failed)
        failed.update(dict.fromkeys(bad, "inference failed: the model returned non-finite probabilities"))
        return Result(
            result.items, result.classifier, result.probabilities, failed, decided_by=result.decided_by
        )

    @staticmethod
    def _canary_error(classifier: Classifier) -> str | None:
        """Why the runtime cannot classify a known-good text, or None when it can."""
        row = _attempt(lambda: classifier.predict_proba([_CANARY_TEXT]))
        if isinstance(row, _Failure):
            return row.reason
        return None if np.isfinite(row).all() else "the model returns non-finite probabilities"

    def _broken(self, job: Job[T], classifier: Classifier, reason: str) -> Result[T]:
        return self._broken_result(job.items, classifier, reason)

    @staticmethod
    def _broken_result(items: Sequence[T], classifier: Classifier, reason: str) -> Result[T]:
        empty = np.zeros((len(items), len(classifier.labels)), dtype=np.float32)
        return Result(list(items), classifier, empty, broken=reason)
