"""Training recipes: named presets of :class:`TrainingConfig`'s recipe parts.

``setfit`` is plain SetFit (what the setfit library does, for parity checks) and the
default: no other preset has met the accuracy target of issue #15 in the benchmark
(``benchmarks/accuracy.py``; figures in docs/performance.md#accuracy-against-setfit). The
others are the candidates, each a part or a combination of parts:

- ``fast``: no ``(x, x)`` pairs, and the training length fitted to short texts;
- ``anchors``: cleaned label names as extra contrastive examples, behind the zero-shot gate;
- ``centroid``: a nearest-centroid cosine score blended into the logistic head;
- ``names``: the cleaned label names' cosine added to the logits, behind the zero-shot gate;
- ``supcon``: SupCon on class-balanced P×K batches instead of cosine loss on pairs;
- ``combined``: ``fast`` + ``anchors`` + ``centroid``.
"""

from __future__ import annotations

from typing import Any

from stream_classifier.errors import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    "setfit": {},
    "fast": {"drop_self_pairs": True, "fit_max_length": True},
    "anchors": {"label_anchors": "gated"},
    "centroid": {"centroid_weight": 0.5},
    "names": {"label_prior": "gated"},
    "supcon": {"loss": "supcon"},
    "combined": {
        "drop_self_pairs": True,
        "fit_max_length": True,
        "label_anchors": "gated",
        "centroid_weight": 0.5,
    },
}
DEFAULT_RECIPE = "setfit"

# Settings that change the body's training; a recipe differing only elsewhere (the head)
# trains the same body from the same examples and seed.
HEAD_SETTINGS = frozenset(
    {
        "recipe",
        "centroid_weight",
        "centroid_temperature",
        "label_prior",
        "label_prior_weight",
        "head_only",
        "show_progress_bar",
    }
)


def recipe_parts(name: str) -> dict[str, Any]:
    """Recipe ``name``'s settings; :class:`~stream_classifier.model.training.TrainingConfig`
    fills them in for every field not given explicitly (an explicit setting wins)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown training recipe {name!r}: use one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])
