"""What the serving loop sees of a model: the :class:`Classifier` protocol (imports no torch).

:class:`~stream_classifier.model.runtime.ModelRuntime` implements it; the unit tier's stub
does too. ``prepare`` runs on the I/O thread (tokenising), ``infer`` only on the compute
thread; ``predict_proba`` is both in one call, for isolating a failing message.

A runtime that combines models (the cascade) returns probabilities with a ``decided_by``
attribute, one model name per row; :func:`decided_by` reads it without importing the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray


class Classifier(Protocol):
    @property
    def labels(self) -> list[str]:
        """The class names, in the order of the probability columns."""

    @property
    def version(self) -> str: ...

    @property
    def thresholds(self) -> Mapping[str, float]:
        """Label -> minimum probability fitted with the model (empty when none was fitted)."""

    @property
    def base_model(self) -> str: ...

    @property
    def device(self) -> object: ...

    @property
    def precision(self) -> object:
        """What the body computes in (``fp32``, ``fp16``, ``bf16``)."""

    @property
    def quantize(self) -> str:
        """``int8`` when the body runs int8 weights (fp32 around them), else ``none``."""

    def prepare(self, texts: Sequence[str]) -> Any:
        """The texts made ready for :meth:`infer` (tokenised, sorted, padded)."""

    def infer(self, prepared: Any) -> NDArray[np.float32]:
        """Probabilities, one row per text of ``prepared``, in input order."""

    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float32]: ...


def decided_by(probabilities: object, rows: int) -> Sequence[str] | None:
    """Which model decided each of the ``rows`` rows of ``probabilities``, or None when they do
    not say (a plain runtime) or say it for another number of rows (an array derived from one)."""
    names = getattr(probabilities, "decided_by", None)
    if names is None or len(names) != rows:
        return None
    return tuple(str(name) for name in names)
