"""The promotion gate: whether a challenger's scores earn it the champion's place.

It decides on macro-F1 and accuracy only (calibration never changes a prediction, so it
cannot change those). It records ``ece`` and ``log_loss`` (champion -> challenger, per
split, lower is better) at the end of every decision's reason; the run record and the
``retrain_score`` gauge hold the figures themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_classifier.learn.challenger import Scores


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def gate(scores: dict[str, dict[str, Scores]], *, min_improvement: float, trusted: bool) -> Decision:
    """The promotion decision for ``scores`` (role -> split -> metric); see the module docstring."""
    decision = _decide(scores, min_improvement=min_improvement, trusted=trusted)
    return Decision(decision.promote, decision.reason + calibration_note(scores))


def calibration_note(scores: dict[str, dict[str, Scores]]) -> str:
    """`` (holdout ece 0.1200 -> 0.0400; ...)`` for the calibration scores both roles have."""
    parts = []
    for split in ("holdout", "trusted"):
        champion = scores["champion"].get(split, {})
        challenger = scores["challenger"].get(split, {})
        for metric, name in (("ece", "ece"), ("log_loss", "log-loss")):
            if metric in champion and metric in challenger:
                parts.append(f"{split} {name} {champion[metric]:.4f} -> {challenger[metric]:.4f}")
    return f" ({'; '.join(parts)})" if parts else ""


def _decide(scores: dict[str, dict[str, Scores]], *, min_improvement: float, trusted: bool) -> Decision:
    champion, challenger = scores["champion"]["holdout"], scores["challenger"]["holdout"]
    gain = challenger["macro_f1"] - champion["macro_f1"]
    if gain <= min_improvement:
        return Decision(
            False,
            f"held-out macro-F1 {challenger['macro_f1']:.4f} does not beat the champion's "
            f"{champion['macro_f1']:.4f} by more than {min_improvement}",
        )
    if challenger["accuracy"] < champion["accuracy"]:
        return Decision(
            False,
            f"held-out accuracy {challenger['accuracy']:.4f} < champion's {champion['accuracy']:.4f}",
        )
    if trusted:
        t_champion, t_challenger = scores["champion"]["trusted"], scores["challenger"]["trusted"]
        for metric in ("macro_f1", "accuracy"):
            if t_challenger[metric] < t_champion[metric]:
                return Decision(
                    False,
                    f"trusted-set {metric} {t_challenger[metric]:.4f} falls below the champion's "
                    f"{t_champion[metric]:.4f}",
                )
    return Decision(True, f"held-out macro-F1 +{gain:.4f}")
