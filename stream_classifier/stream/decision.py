"""The decision: which label a message is published under, from its probabilities.

Pure: no I/O, no state beyond the settings. A message is published under its top label
(the argmax) only when that label's probability reaches the label's threshold; otherwise
under ``decision.abstain_label``, with ``top_label`` keeping the argmax. Invariants:

- **Effective threshold** of a label: ``decision.thresholds[label]`` when set, else the
  threshold fitted with the model (:attr:`Classifier.thresholds`), else none (the label is
  always published as itself).
- **Inclusive boundary**: a probability equal to its threshold is published under the label.
- **No abstain label, no abstention**: with ``decision.abstain_label`` unset every message
  gets its argmax label, whatever the thresholds (settings refuse thresholds without an
  abstain label; fitted ones are then ignored).
- **The probability compared is the one published** (the renormalised row of
  :func:`~stream_classifier.stream.codec.published_rows`), so a reader of the output can
  check the decision against its ``probabilities``.

The hot path: :func:`column_thresholds` runs once per batch, :meth:`Decider.decide` once
per message (two list lookups and a comparison).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stream_classifier.config import DecisionSettings


@dataclass(frozen=True, slots=True)
class Decision:
    label: str  # the label published: the top label, or the abstain label
    top_label: str  # the argmax
    confidence: float  # the top label's probability
    abstained: bool


def column_thresholds(
    labels: Sequence[str], configured: Mapping[str, float], fitted: Mapping[str, float]
) -> list[float | None]:
    """Each label's effective threshold, in the probability columns' order."""
    return [configured.get(label, fitted.get(label)) for label in labels]


class Decider:
    """Decides messages by ``decision.*``; see the module docstring."""

    def __init__(self, settings: DecisionSettings) -> None:
        self.abstain_label = settings.abstain_label
        self._configured = dict(settings.thresholds)

    @property
    def configured_labels(self) -> list[str]:
        """The labels ``decision.thresholds`` names."""
        return list(self._configured)

    @property
    def active(self) -> bool:
        """Whether a message can abstain (an abstain label is set)."""
        return self.abstain_label is not None

    def thresholds(self, labels: Sequence[str], fitted: Mapping[str, float]) -> list[float | None]:
        """The effective thresholds for a model's ``labels`` and its ``fitted`` ones."""
        if self.abstain_label is None:
            return [None] * len(labels)
        return column_thresholds(labels, self._configured, fitted)

    def decide(
        self, labels: Sequence[str], row: Sequence[float], best: int, thresholds: Sequence[float | None]
    ) -> Decision:
        """The decision for one message: ``row`` its probabilities, ``best`` their argmax."""
        top = labels[best]
        confidence = row[best]
        threshold = thresholds[best]
        if threshold is None or confidence >= threshold or self.abstain_label is None:
            return Decision(top, top, confidence, abstained=False)
        return Decision(self.abstain_label, top, confidence, abstained=True)
