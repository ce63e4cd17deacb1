"""What the runtime needs to know about an accelerator, as pure functions of what torch reports.

Invariants:

- :func:`cuda_auto_precision` is bf16 only where the device computes bf16 natively (compute
  capability 8.0 and later: Ampere, Hopper, ...); ``torch.cuda.is_bf16_supported()`` alone
  also says yes for emulated bf16, which is far slower than fp16. Elsewhere it is fp16.
- :func:`is_device_failure` names the errors that leave a CUDA context unusable (a sticky
  error: every later call on that context fails the same way). They are raised as
  :class:`~stream_classifier.errors.DeviceFailedError`, which stops the process; a restart
  gets a fresh context. Out of memory is not one of them (it is recovered from).
- :func:`position_limit` is the longest sequence the body's learned position embeddings can
  index (RoBERTa-style bodies start positions after their padding index); None when the body
  has no such table (nothing to check).
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "fp16", "bf16"]
NATIVE_BF16_CAPABILITY = (8, 0)
# Substrings of the CUDA runtime's messages for sticky errors (cudaGetErrorString), as torch
# raises them (RuntimeError; torch.AcceleratorError since torch 2.8): "CUDA error: <message>".
_STICKY_CUDA_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "the launch timed out",
    "uncorrectable ecc error",
    "hardware stack error",
)


def cuda_auto_precision(capability: tuple[int, int]) -> Precision:
    """``precision: auto`` on a CUDA device of compute ``capability`` (major, minor)."""
    return "bf16" if capability >= NATIVE_BF16_CAPABILITY else "fp16"


def has_native_bf16(capability: tuple[int, int]) -> bool:
    return capability >= NATIVE_BF16_CAPABILITY


def is_device_failure(exc: BaseException) -> bool:
    """True for a device-side CUDA error that leaves the context unusable (see the module docstring)."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    message = str(exc).lower()
    return any(marker in message for marker in _STICKY_CUDA_ERRORS)


def position_limit(body: torch.nn.Module) -> int | None:
    """The longest input the body's first ``position_embeddings`` table indexes, or None."""
    for name, module in body.named_modules():
        if name.rsplit(".", 1)[-1] == "position_embeddings" and isinstance(module, torch.nn.Embedding):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return int(module.num_embeddings) - offset
    return None
