"""Forward passes of a batch: texts grouped by length under a token budget.

Invariants:

- :func:`plan_chunks` covers every position exactly once, each chunk sorted by length, with
  ``rows x longest row <= token_budget`` (a single longer text gets a chunk of its own);
- a :class:`Chunk`'s features are padded int64 tensors on the host, rows in ``positions``
  order; :meth:`Chunk.split` and :meth:`Chunk.select` trim the padding their own longest
  row does not need, so a retried piece never costs more than its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

DEFAULT_TOKEN_BUDGET = 16_384
# The fixed cost of one forward pass on the CPU, in tokens' worth of compute: the padding a
# chunk may add before a new pass is cheaper. Swept on the bench's texts (docs/performance.md,
# "Padding"): 32 was fastest at batches 64 and 128 for torch fp32 and int8 alike (16-64
# within noise, 128 ~10-15 % slower). On CUDA a pass (its kernel launches) is the larger
# cost, so only the token budget splits there.
CPU_PASS_COST_TOKENS = 32


@dataclass(frozen=True)
class Chunk:
    """One forward pass: the original positions of its texts and their padded features."""

    positions: NDArray[np.int64]
    features: dict[str, torch.Tensor]

    @property
    def tokens(self) -> int:
        ids = self.features["input_ids"]
        return int(ids.shape[0] * ids.shape[1])

    def split(self) -> tuple[Chunk, Chunk]:
        """Two halves, each trimmed of the padding its own longest row does not need."""
        half = len(self.positions) // 2
        rows = np.arange(len(self.positions))
        return self.select(rows[:half]), self.select(rows[half:])

    def select(self, rows: NDArray[np.int64]) -> Chunk:
        """The chunk of ``rows`` (indices into this chunk, ascending), trimmed of unneeded padding."""
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        mask = self.features["attention_mask"].index_select(0, index)
        width = int(mask.sum(dim=1).max().item()) if len(index) else 0
        features = {key: value.index_select(0, index)[:, :width] for key, value in self.features.items()}
        return Chunk(self.positions[np.asarray(rows, dtype=np.int64)], features)


@dataclass(frozen=True)
class PreparedBatch:
    """Texts tokenised and grouped for the forward passes (see ``ModelRuntime.prepare``)."""

    size: int
    chunks: list[Chunk]

    @property
    def tokens(self) -> int:
        return sum(chunk.tokens for chunk in self.chunks)


def plan_chunks(
    lengths: Sequence[int], token_budget: int, pass_cost_tokens: int | None = None
) -> list[NDArray[np.int64]]:
    """Group positions, sorted by length, so that rows x longest row <= ``token_budget``.

    With ``pass_cost_tokens``, a chunk also ends before a row whose extra length, padded onto
    every row already in the chunk, would cost more tokens than that (a greedy bound on
    padding). A single text longer than the budget still gets a chunk of its own.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    chunks: list[NDArray[np.int64]] = []
    start = 0
    for end in range(2, len(order) + 1):
        # Ascending lengths: the row at end-1 is the chunk's longest, end-2 its previous longest.
        rows, longest = end - start, lengths[order[end - 1]]
        if rows > 1 and (
            rows * longest > token_budget
            or (
                pass_cost_tokens is not None
                and (rows - 1) * (longest - lengths[order[end - 2]]) > pass_cost_tokens
            )
        ):
            chunks.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        chunks.append(order[start:])
    return chunks
