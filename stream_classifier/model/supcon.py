"""Supervised contrastive learning (SupCon, as in FastFit) on class-balanced P×K batches.

A step encodes one batch of texts once (no pairs): ``P`` labels, ``K`` texts of each, at most
``texts_per_batch`` texts (the same text budget as a step of ``texts_per_batch / 2`` pairs).
Every text in the batch is an anchor; its positives are the other texts of its label.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from stream_classifier.errors import TrainingError
from stream_classifier.model.examples import Example


class PKSampler:
    """Seeded, endless class-balanced batches: each batch takes the next ``P`` labels of a
    shuffled cycle over the labels and the next ``K`` texts of each label's own shuffled cycle.

    Invariants: ``2 <= P <= number of labels``; ``2 <= K <= the smallest label's size`` (so a
    text never appears twice in one batch and every anchor has a positive); ``P * K <=
    texts_per_batch`` unless ``texts_per_batch < 4``, when a batch is 2 × 2.
    """

    def __init__(self, examples: Sequence[Example], texts_per_batch: int, seed: int = 42) -> None:
        members: dict[str, list[int]] = {}
        for index, example in enumerate(examples):
            members.setdefault(example.label, []).append(index)
        if len(members) < 2:
            raise TrainingError("training needs examples of at least two labels")
        smallest = min(len(m) for m in members.values())
        if smallest < 2:
            raise TrainingError("SupCon needs at least two examples of every label")
        self._labels = sorted(members)
        self._members = members
        budget = max(4, texts_per_batch)
        self.p = min(len(self._labels), max(2, budget // 4))
        self.k = max(2, min(smallest, budget // self.p))
        self._rng = np.random.default_rng(seed)

    def _cycle(self, items: list[int]) -> Iterator[int]:
        while True:
            yield from self._rng.permutation(items).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        labels = self._cycle(list(range(len(self._labels))))
        within = {label: self._cycle(m) for label, m in self._members.items()}
        while True:
            chosen = _distinct(labels, self.p)
            yield [i for c in chosen for i in _distinct(within[self._labels[c]], self.k)]


def _distinct(cycle: Iterator[int], n: int) -> list[int]:
    """The next ``n`` distinct items of a cycle (it may wrap, and repeat, mid-draw)."""
    taken: list[int] = []
    while len(taken) < n:
        item = next(cycle)
        if item not in taken:
            taken.append(item)
    return taken


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al.'s L_out: per anchor, minus the mean log-probability of its positives
    among all other texts of the batch, at cosine similarity over ``temperature``."""
    z = torch.nn.functional.normalize(embeddings.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has = counts > 0
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(summed[has] / counts[has]).mean()
