"""CascadeRuntime: the student answers what it is sure of, the transformer the rest.

To the serving loop it is one more :class:`~stream_classifier.stream.classifier.Classifier`
(``prepare`` on the I/O thread, ``infer`` on the compute thread):

- :meth:`CascadeRuntime.prepare` runs the student (:mod:`~stream_classifier.model.student`:
  tokenising and a table lookup, no torch) on the whole micro-batch, marks the rows whose
  top probability is at or above the bound as decided, and prepares (tokenises, chunks)
  only the other rows for the transformer;
- :meth:`CascadeRuntime.infer` runs the transformer on those rows and returns ``(n, k)``
  float32 probabilities **in input order**: a decided row holds the student's calibrated
  probabilities, every other row exactly what the transformer alone returns for it.

Invariants:

- one batch in, one batch out, same length and order: ordering, commits and the one-by-one
  isolation of a failing message are the loop's, unchanged (a failing transformer row fails
  as it would without the cascade);
- every result says which model decided each row: :meth:`infer` and :meth:`predict_proba`
  return :class:`Decided` arrays whose ``decided_by[i]`` is :data:`STUDENT` or
  :data:`TRANSFORMER` (arrays derived from one carry ``None``);
- the student and its bound belong to the transformer's version (checked at load).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_classifier.errors import ModelError
from stream_classifier.model.examples import Example
from stream_classifier.model.student import DEFAULT_TARGET_LOSS, STUDENT_DIR, Student, build_student
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

STUDENT = "student"
TRANSFORMER = "transformer"


class Decided(np.ndarray[Any, np.dtype[np.float32]]):
    """Float32 probabilities ``(n, k)`` with ``decided_by``: who decided each row (or None)."""

    decided_by: tuple[str, ...] | None

    def __array_finalize__(self, obj: object) -> None:
        self.decided_by = None  # a view or copy of some rows would carry stale names


def decided(probabilities: NDArray[np.float32], deciders: Sequence[str]) -> Decided:
    """``probabilities`` (not copied) labelled row by row with ``deciders``."""
    if len(deciders) != len(probabilities):
        raise ValueError(f"{len(deciders)} deciders for {len(probabilities)} rows")
    result = np.asarray(probabilities, dtype=np.float32).view(Decided)
    result.decided_by = tuple(deciders)
    return result


@dataclass(frozen=True)
class CascadeBatch:
    """A batch made ready by :meth:`CascadeRuntime.prepare`."""

    size: int
    student: NDArray[np.float32]  # (n, k) calibrated student probabilities
    sure: NDArray[np.bool_]  # (n,) rows the student decides
    unsure: Any  # the transformer's prepared batch of the other rows, in their input order


class CascadeRuntime:
    """A transformer runtime with a student in front; see the module docstring."""

    def __init__(self, transformer: Any, student: Student, *, bound: float | None = None) -> None:
        if list(student.labels) != list(transformer.labels):
            raise ModelError(
                f"the student's labels {student.labels} differ from the model's {transformer.labels}: "
                "rebuild the student"
            )
        self.transformer = transformer
        self.student = student
        self.bound = student.bound if bound is None else float(bound)

    @classmethod
    def load(cls, path: Path | str, *, bound: float | None = None, **runtime_options: Any) -> CascadeRuntime:
        """The transformer (:meth:`ModelRuntime.load` with ``runtime_options``) and its student."""
        from stream_classifier.model.runtime import ModelRuntime  # noqa: PLC0415 - torch-heavy

        started = time.perf_counter()
        transformer = ModelRuntime.load(path, **runtime_options)
        student = Student.load(path, model_version=transformer.version)
        runtime = cls(transformer, student, bound=bound)
        log_event(
            log,
            "cascade_loaded",
            path=str(Path(path) / STUDENT_DIR),
            version=runtime.version,
            bound=runtime.bound,
            seconds=round(time.perf_counter() - started, 3),
        )
        return runtime

    # ------------------------------------------------------------------ what the loop reads

    @property
    def labels(self) -> list[str]:
        return list(self.transformer.labels)

    @property
    def version(self) -> str:
        return str(self.transformer.version)

    @property
    def thresholds(self) -> dict[str, float]:
        """The model's fitted thresholds, for the student's rows too (both heads are calibrated)."""
        return dict(getattr(self.transformer, "thresholds", {}))

    @property
    def base_model(self) -> str:
        return str(self.transformer.base_model)

    @property
    def device(self) -> object:
        return self.transformer.device

    @property
    def precision(self) -> object:
        return self.transformer.precision

    @property
    def quantize(self) -> str:
        return str(self.transformer.quantize)

    @property
    def bundle(self) -> Any:
        return self.transformer.bundle

    # ------------------------------------------------------------------ prepare / infer

    def prepare(self, texts: Sequence[str]) -> CascadeBatch:
        """The student on every text; the transformer's preparation of the rows it leaves."""
        student = self.student.predict_proba(texts)
        sure = student.max(axis=1) >= self.bound if len(texts) else np.zeros(0, dtype=bool)
        unsure = [text for text, decided_ in zip(texts, sure, strict=True) if not decided_]
        return CascadeBatch(len(texts), student, sure, self.transformer.prepare(unsure))

    def infer(self, prepared: CascadeBatch) -> Decided:
        """``(n, k)`` float32 probabilities in input order, each row named by its decider."""
        output = prepared.student.copy()
        rows = np.flatnonzero(~prepared.sure)
        if len(rows):
            output[rows] = self.transformer.infer(prepared.unsure)
        deciders = np.where(prepared.sure, STUDENT, TRANSFORMER)
        return decided(output, [str(name) for name in deciders])

    def predict_proba(self, texts: Sequence[str]) -> Decided:
        return self.infer(self.prepare(texts))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(axis=1)]

    def warmup(self) -> None:
        self.transformer.warmup()
        self.student.predict_proba(["warm up"])


def build_cascade(
    model_dir: Path | str,
    *,
    holdout: Sequence[Example] = (),
    target_loss: float = DEFAULT_TARGET_LOSS,
    trusted: bool = False,
) -> Student:
    """Build and save ``model_dir``'s student in one call (what a promotion runs).

    The teacher is the directory's own model on the CPU in fp32, the examples its kept
    training examples, the bound fitted on ``holdout`` when given (see
    :func:`~stream_classifier.model.student.build_student`). A student already there is
    replaced whole.
    """
    from stream_classifier.model.runtime import ModelRuntime  # noqa: PLC0415 - torch-heavy

    teacher = ModelRuntime.load(model_dir, device="cpu", precision="fp32", trusted=trusted)
    examples = teacher.bundle.examples
    return build_student(model_dir, teacher, examples, holdout=holdout, target_loss=target_loss)
