"""The per-chunk computations of a runtime: padded host features in, float32 rows out.

Invariants:

- a computation captures the body and head it runs, never the runtime that owns it (so a
  swapped-out runtime is freed by reference counting, with no cycle for the collector);
- the autocast dtype is an argument of each call (None: fp32, no autocast), so a runtime's
  precision can change between calls (the CPU probe, fp32 recomputation of bad rows);
- torch computations return their rows on the device, unsynchronised; :func:`gather`
  brings a batch's rows back in one copy;
- :func:`attempt` returns None for out of memory on several rows *after* leaving the
  handler: the exception, its traceback and the failed pass's frames are gone by then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from stream_classifier.model.chunks import Chunk
from stream_classifier.model.head import LinearHead
from stream_classifier.model.int8 import Int8Body

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What the runtime computes per chunk: padded host features and the autocast dtype (None:
# fp32) in; float32 rows (embeddings or probabilities) out, on the device (torch) or the host
# (numpy, int8 mode). The dtype is read from ``precision`` at each call, never captured.
ChunkValues = torch.Tensor | NDArray[np.float32]
ChunkCompute = Callable[[dict[str, torch.Tensor], torch.dtype | None], ChunkValues]


def attempt(compute: ChunkCompute, chunk: Chunk, autocast: torch.dtype | None) -> ChunkValues | None:
    """``compute`` on ``chunk``, or None when a chunk of several rows ran out of memory.

    The exception is dropped on return, and with it its traceback and the frames it holds.
    """
    try:
        return compute(chunk.features, autocast)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5
        if len(chunk.positions) == 1:
            raise
    return None


def gather(pieces: list[tuple[Chunk, ChunkValues]], output: NDArray[np.float32]) -> None:
    """Write each piece's rows to ``output`` at its positions: one device-to-host copy in all."""
    if not pieces:
        return
    positions = np.concatenate([chunk.positions for chunk, _ in pieces])
    values = [value for _, value in pieces]
    if isinstance(values[0], torch.Tensor):
        output[positions] = torch.cat(values).float().cpu().numpy()  # type: ignore[arg-type]
    else:
        output[positions] = np.concatenate(values)


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def torch_computations(
    body: torch.nn.Module, head: torch.nn.Module, device: torch.device, normalize: bool
) -> tuple[ChunkCompute, ChunkCompute]:
    """Embedding and probability computations on ``device``; they capture no runtime."""

    def embed(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        on_device = {key: value.to(device, non_blocking=True) for key, value in features.items()}
        with autocast_to(device, autocast):
            embeddings: torch.Tensor = body(on_device)["sentence_embedding"]
        embeddings = embeddings.float()
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        return embeddings

    def classify(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        probabilities: torch.Tensor = head(embed(features, autocast))
        return probabilities

    return embed, classify


def int8_computations(body: Int8Body, head: LinearHead, normalize: bool) -> tuple[ChunkCompute, ChunkCompute]:
    """int8 mode's numpy computations (always fp32 around int8 weights: the dtype is moot)."""

    def embed(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> NDArray[np.float32]:
        embeddings = body(features)
        if normalize:  # as torch.nn.functional.normalize: x / max(||x||, 1e-12)
            norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
            embeddings = embeddings / np.maximum(norms, 1e-12)
        return embeddings

    def classify(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> NDArray[np.float32]:
        return head.predict_proba(embed(features, autocast)).astype(np.float32)

    return embed, classify
