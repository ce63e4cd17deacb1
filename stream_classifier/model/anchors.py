"""Label names as anchors: each class's cleaned name as one extra example of that class in
the contrastive stage, used only when the base body already reads the names.

Gate: the base body's zero-shot accuracy on the training texts (each text assigned the
label whose cleaned name it is most cosine-similar to) must be above chance ``1/k`` by
more than two binomial standard errors, ``2 * sqrt(p (1 - p) / n)``. Names that mean
nothing to the body ("LABEL_3", codes) fail the gate and change nothing.
The gate also decides the label-name prior (``model/geometry.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sentence_transformers import SentenceTransformer

from stream_classifier.model.examples import Example

# Newsgroup-style hierarchy words that say nothing about the topic ("comp.sys.mac.hardware").
_HIERARCHY = {"alt", "comp", "misc", "ms", "os", "rec", "sci", "soc", "sys", "talk"}
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_SEPARATORS = re.compile(r"[._\-/:|]+|\s+")


def clean_label(label: str) -> str:
    """A label as words: separators and camelCase split, hierarchy words dropped, lower case
    (``comp.sys.mac.hardware`` -> ``mac hardware``, ``TechSupport`` -> ``tech support``).
    A label of hierarchy words only keeps them all."""
    words = [w.lower() for w in _SEPARATORS.split(_CAMEL.sub(" ", label)) if w]
    kept = [w for w in words if w not in _HIERARCHY]
    return " ".join(kept or words)


@dataclass(frozen=True)
class AnchorDecision:
    """Whether anchors are used, and the evidence: zero-shot accuracy against its bar."""

    use: bool
    zero_shot_accuracy: float
    bar: float


def zero_shot_gate(body: SentenceTransformer, examples: Sequence[Example]) -> AnchorDecision:
    """The gate of the module docstring, on the (base) ``body`` as given."""
    labels = sorted({e.label for e in examples})
    names = body.encode([clean_label(label) for label in labels], normalize_embeddings=True)
    texts = body.encode([e.text for e in examples], normalize_embeddings=True)
    predicted = np.asarray(labels)[np.argmax(np.asarray(texts) @ np.asarray(names).T, axis=1)]
    accuracy = float(np.mean(predicted == np.asarray([e.label for e in examples])))
    chance = 1.0 / len(labels)
    bar = chance + 2.0 * math.sqrt(chance * (1.0 - chance) / len(examples))
    return AnchorDecision(use=accuracy > bar, zero_shot_accuracy=round(accuracy, 4), bar=round(bar, 4))


def anchor_examples(labels: Sequence[str]) -> list[Example]:
    """One example per label: its cleaned name."""
    return [Example(clean_label(label), label) for label in sorted(set(labels))]
