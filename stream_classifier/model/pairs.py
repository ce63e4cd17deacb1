"""Contrastive pairs with setfit's ``ContrastiveDataset`` semantics, generated lazily.

Candidate pairs are all ``(i, j)`` with ``i <= j`` (self-pairs included, as setfit), or
``i < j`` with ``drop_self_pairs`` (an ``(x, x)`` pair has cosine 1 before any training,
so it teaches nothing: its slot goes to a real pair). Positives and negatives alternate
(setfit's ``zip_longest``: once the shorter side is done, the longer goes on alone); each
side yields ``L`` pairs, cycling through its candidates in a seeded random order, where
``L`` is ``num_iterations * n`` when ``num_iterations`` is set, else the larger
(``oversampling``) or smaller (``undersampling``) side's count, or for ``unique`` each
side's own count (every candidate once). No pair list is ever built: a pair is computed
from its rank in O(1) memory, so large sets cannot run out of memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from stream_classifier.errors import TrainingError
from stream_classifier.model.examples import Example

SamplingStrategy = Literal["oversampling", "undersampling", "unique"]


def _unrank_triangle(k: int, n: int) -> tuple[int, int]:
    """The k-th pair ``(a, b)``, ``a <= b < n``, in row-major order of the upper triangle."""
    # Row a starts at a*n - a*(a-1)/2; invert the quadratic, then fix rounding.
    a = int(((2 * n + 1) - math.sqrt((2 * n + 1) ** 2 - 8 * k)) // 2)
    while a > 0 and a * n - a * (a - 1) // 2 > k:
        a -= 1
    while (a + 1) * n - (a + 1) * a // 2 <= k:
        a += 1
    return a, a + (k - (a * n - a * (a - 1) // 2))


class _PairSpace:
    """A ranked space of candidate pairs with O(1)-memory random-order cycling."""

    def __init__(self, blocks: list[tuple[Any, int]]) -> None:
        self._blocks = [(key, size) for key, size in blocks if size > 0]
        self._starts = np.cumsum([0] + [size for _, size in self._blocks])
        self.size = int(self._starts[-1])

    def locate(self, rank: int) -> tuple[Any, int]:
        block = int(np.searchsorted(self._starts, rank, side="right")) - 1
        return self._blocks[block][0], rank - int(self._starts[block])

    def cycle(self, rng: np.random.Generator) -> Iterator[int]:
        """Ranks forever: each pass visits every rank once, in a fresh affine permutation."""
        while True:
            step = int(rng.integers(1, max(2, self.size)))
            while math.gcd(step, self.size) != 1:
                step += 1
            offset = int(rng.integers(0, self.size))
            for i in range(self.size):
                yield (offset + i * step) % self.size


class ContrastivePairs:
    """Lazily generated contrastive pairs; see the module docstring for the semantics."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        sampling_strategy: SamplingStrategy = "oversampling",
        num_iterations: int | None = None,
        seed: int = 42,
        drop_self_pairs: bool = False,
    ) -> None:
        self._texts = [e.text for e in examples]
        members: dict[str, list[int]] = {}
        for index, example in enumerate(examples):
            members.setdefault(example.label, []).append(index)
        if len(members) < 2:
            raise TrainingError("training needs examples of at least two labels")
        self._members = list(members.values())
        sizes = [len(m) for m in self._members]
        self._strict = drop_self_pairs
        extra = -1 if drop_self_pairs else 1  # s(s-1)/2 pairs a < b, or s(s+1)/2 pairs a <= b
        self._positives = _PairSpace([(i, s * (s + extra) // 2) for i, s in enumerate(sizes)])
        if self._positives.size == 0:
            raise TrainingError("without self-pairs, training needs two examples of some label")
        self._negatives = _PairSpace(
            [((i, j), sizes[i] * sizes[j]) for i in range(len(sizes)) for j in range(i + 1, len(sizes))]
        )
        self._seed = seed
        if num_iterations:
            self.positives = self.negatives = num_iterations * len(examples)
        elif sampling_strategy == "unique":
            self.positives, self.negatives = self._positives.size, self._negatives.size
        elif sampling_strategy == "undersampling":
            self.positives = self.negatives = min(self._positives.size, self._negatives.size)
        else:
            self.positives = self.negatives = max(self._positives.size, self._negatives.size)

    def __len__(self) -> int:
        return self.positives + self.negatives

    def _positive(self, rank: int) -> tuple[int, int]:
        label, k = self._positives.locate(rank)
        group = self._members[label]
        if self._strict:  # pairs a < b of n are pairs a <= b' of n - 1, with b = b' + 1
            a, b = _unrank_triangle(k, len(group) - 1)
            return group[a], group[b + 1]
        a, b = _unrank_triangle(k, len(group))
        return group[a], group[b]

    def _negative(self, rank: int) -> tuple[int, int]:
        (i, j), k = self._negatives.locate(rank)
        right = self._members[j]
        return self._members[i][k // len(right)], right[k % len(right)]

    def __iter__(self) -> Iterator[tuple[str, str, float]]:
        rng = np.random.default_rng(self._seed)
        positives = self._positives.cycle(rng)
        negatives = self._negatives.cycle(rng)
        for index in range(max(self.positives, self.negatives)):  # setfit's zip_longest
            if index < self.positives:
                a, b = self._positive(next(positives))
                yield self._texts[a], self._texts[b], 1.0
            if index < self.negatives:
                a, b = self._negative(next(negatives))
                yield self._texts[a], self._texts[b], 0.0
