"""Resource limits of the training child process, applied before torch starts any thread pool.

The child shares the machine, and on CUDA the GPU, with the serving process; ``nice`` and
thread counts do nothing for GPU scheduling or GPU memory, so on CUDA its memory is capped.

Invariants:

- the child's priority is lowered (``os.nice``) and torch's intra-op threads capped (one
  inter-op thread), whatever the device;
- on the CPU, ``max_memory_mb`` caps the address space (``RLIMIT_AS``): a run over it fails
  inside the child with a MemoryError, never in the serving process;
- on CUDA, an address-space cap is refused with a :class:`~stream_classifier.errors.TrainingError`
  that says what to use: CUDA reserves virtual address space far beyond physical memory, so
  its context does not start under such a cap. The child's GPU memory is capped instead with
  ``torch.cuda.set_per_process_memory_fraction``: an allocation over its share raises out of
  memory in the child, and the serving model keeps the rest.
"""

from __future__ import annotations

import os
import resource

import torch

from stream_classifier.errors import TrainingError
from stream_classifier.model.runtime import resolve_device


def apply_child_limits(
    *,
    device: str,
    nice: int,
    torch_threads: int,
    max_memory_mb: int | None,
    gpu_memory_fraction: float | None,
) -> torch.device:
    """Apply the limits above (a refusal comes before any of them); returns the training device."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and max_memory_mb is not None:
        raise TrainingError(
            "retrain.max_memory_mb caps the address space (RLIMIT_AS), which CUDA cannot run under: "
            "unset it and cap the child's GPU memory with retrain.gpu_memory_fraction, or train on "
            "retrain.device=cpu"
        )
    os.nice(nice)
    if resolved.type == "cuda":
        if gpu_memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction, resolved)
    elif max_memory_mb is not None:
        limit = max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(torch_threads)
    torch.set_num_interop_threads(1)
    return resolved
