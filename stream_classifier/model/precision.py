"""Precision on the CPU: the processor's features, and whether bf16 autocast pays on this model.

``model.precision: auto`` on the CPU is decided here, once per loaded runtime at warm-up:

- without native bf16 (``amx_bf16`` or ``avx512_bf16`` in the CPU flags) it is fp32, and
  nothing is measured: emulated bf16 runs several times slower than fp32;
- with native bf16, a probe times fp32 and bf16 autocast on the loaded model, interleaved
  in rounds on a batch of :data:`PROBE_TOKENS` padded tokens (or the token budget, if
  smaller), within about :data:`PROBE_BUDGET_S` seconds (fewer rows and rounds where a
  pass is slow; a CPU shared with other work stretches it); bf16 is chosen only when it is at least
  :data:`MIN_BF16_SPEEDUP` times as fast **and** its probabilities on the probe batch stay
  within :data:`AMP_TOLERANCE` of fp32's (the documented AMP tolerance, docs/models.md);
  a probe that fails (an operator without a bf16 kernel) leaves fp32;
- an explicit ``fp32``/``fp16``/``bf16`` is never second-guessed and nothing is probed.

The flags are read from ``/proc/cpuinfo`` (none elsewhere, so fp32); the decision
(:func:`decide_cpu_precision`) takes the flags and the probe as arguments, so every
combination is testable on any machine. CUDA's rule lives in
:func:`stream_classifier.model.runtime.resolve_precision`; nothing here runs on CUDA.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""Any one of these means the CPU computes bf16 dot products natively."""
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
"""The flags logged with the choice: the ones that decide fp32, bf16 and int8 speed."""
MIN_BF16_SPEEDUP = 1.15
"""bf16 must beat fp32 by this factor on the probe (the probe's own noise is ~5 %)."""
AMP_TOLERANCE = 0.01
"""Largest |p_bf16 - p_fp32| on the probe batch (docs/models.md, "Inference runtime")."""
PROBE_TOKENS = 4_096
PROBE_ROUNDS = 3
PROBE_BUDGET_S = 2.0
PROBE_MIN_ROWS = 4
PROBE_CALIBRATION_ROWS = 8
_PROBE_VOCABULARY = (
    "order refund parcel account password invoice delivery payment error screen app login "
    "shipping address late charged twice card support message update version crash week "
    "please thanks help number customer service email phone reset link page website fee "
    "the a of to and in is it for on with my was not this that be have at"
)
_PROBE_WORDS = _PROBE_VOCABULARY.split()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo``'s text (empty if none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU flags; empty where ``path`` is unreadable (not Linux)."""
    try:
        return parse_cpu_flags(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return frozenset()


def has_native_bf16(flags: frozenset[str]) -> bool:
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


@dataclass(frozen=True)
class ProbeFigures:
    """What the bf16 probe measured: the fastest pass's seconds of each, and the largest |Δp|."""

    fp32_s: float
    bf16_s: float
    rounds: int
    rows: int
    tokens: int
    max_prob_diff: float

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0

    def as_fields(self) -> dict[str, Any]:
        return {
            "fp32_ms": round(1000 * self.fp32_s, 2),
            "bf16_ms": round(1000 * self.bf16_s, 2),
            "bf16_speedup": round(self.speedup, 3),
            "max_prob_diff": round(self.max_prob_diff, 6),
            "rounds": self.rounds,
            "rows": self.rows,
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a CPU runtime computes in, and why."""

    precision: str
    reason: str
    flags: frozenset[str]
    probe: ProbeFigures | None = None

    def as_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "precision": self.precision,
            "reason": self.reason,
            "cpu_features": sorted(f for f in REPORTED_FLAGS if f in self.flags),
        }
        if self.probe is not None:
            fields["probe"] = self.probe.as_fields()
        return fields


def decide_cpu_precision(
    requested: str, flags: frozenset[str], probe: Callable[[], ProbeFigures]
) -> PrecisionChoice:
    """The CPU precision for ``requested``; ``probe`` is called only for ``auto`` with native bf16."""
    if requested != "auto":
        return PrecisionChoice(requested, "explicit setting", flags)
    if not has_native_bf16(flags):
        return PrecisionChoice("fp32", "no native bf16 (neither amx_bf16 nor avx512_bf16)", flags)
    try:
        figures = probe()
    except RuntimeError as exc:  # torch's error for an operator without a bf16 CPU kernel
        return PrecisionChoice("fp32", f"bf16 probe failed ({type(exc).__name__}: {exc})", flags)
    if not math.isfinite(figures.max_prob_diff) or figures.max_prob_diff > AMP_TOLERANCE:
        reason = f"bf16 outside the AMP tolerance: max |dp| {figures.max_prob_diff:.4g} > {AMP_TOLERANCE}"
        return PrecisionChoice("fp32", reason, flags, figures)
    if figures.speedup < MIN_BF16_SPEEDUP:
        reason = f"bf16 {figures.speedup:.2f}x fp32 on the probe, under {MIN_BF16_SPEEDUP}x"
        return PrecisionChoice("fp32", reason, flags, figures)
    reason = f"bf16 {figures.speedup:.2f}x fp32 within the AMP tolerance"
    return PrecisionChoice("bf16", reason, flags, figures)


class ProbedRuntime(Protocol):
    """What the probe needs of :class:`~stream_classifier.model.runtime.ModelRuntime`:
    ``infer`` computes in whatever ``precision`` says when it is called."""

    precision: Any
    token_budget: int
    max_seq_length: int

    def prepare(self, texts: Sequence[str]) -> Any: ...

    def infer(self, prepared: Any) -> NDArray[np.float32]: ...


def probe_texts(rows: int, words: int, seed: int = 0) -> list[str]:
    """``rows`` varied, deterministic texts of ``words`` common words each."""
    pick = random.Random(seed)
    return [" ".join(pick.choices(_PROBE_WORDS, k=words)) for _ in range(rows)]


def probe_bf16(
    runtime: ProbedRuntime,
    *,
    tokens: int = PROBE_TOKENS,
    rounds: int = PROBE_ROUNDS,
    budget_s: float = PROBE_BUDGET_S,
) -> ProbeFigures:
    """Time fp32 against bf16 autocast on ``runtime``'s model, interleaved; see the module
    docstring for the bounds. ``runtime.precision`` is restored whatever happens."""
    started = time.perf_counter()
    length = max(8, min(runtime.max_seq_length, 64))
    rows = max(PROBE_MIN_ROWS, min(tokens, runtime.token_budget) // length)
    saved = runtime.precision

    def timed(precision: str, batch: Any) -> tuple[float, NDArray[np.float32]]:
        runtime.precision = precision
        begin = time.perf_counter()
        probabilities = runtime.infer(batch)
        return time.perf_counter() - begin, probabilities

    try:
        # A small pass first (it also warms fp32) prices a row, so that the probe's batch fits
        # the budget: 2 warm passes and 2 per round, bf16 priced as fp32.
        small = min(rows, PROBE_CALIBRATION_ROWS)
        first, _ = timed("fp32", runtime.prepare(probe_texts(small, length - 2)))
        per_row = first / small
        if per_row > 0:
            rows = max(PROBE_MIN_ROWS, min(rows, int(budget_s / (per_row * (2 + 2 * rounds)))))
        batch = runtime.prepare(probe_texts(rows, length - 2))
        _, reference = timed("fp32", batch)
        _, low = timed("bf16", batch)  # the first bf16 pass builds its kernels: not timed
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(rounds):
            for precision in ("fp32", "bf16"):
                times[precision].append(timed(precision, batch)[0])
            if time.perf_counter() - started + times["fp32"][-1] + times["bf16"][-1] > budget_s:
                break  # another round would overrun the budget
    finally:
        runtime.precision = saved
    return ProbeFigures(  # the fastest pass of each: other work on the CPU only ever adds time
        fp32_s=min(times["fp32"]),
        bf16_s=min(times["bf16"]),
        rounds=len(times["fp32"]),
        rows=rows,
        tokens=rows * length,
        max_prob_diff=float(np.abs(low - reference).max()),
    )


def choose_cpu_precision(
    runtime: ProbedRuntime, requested: str, flags: frozenset[str] | None = None
) -> PrecisionChoice:
    """Decide (probing ``runtime`` if need be) and log the choice once (``model_precision``)."""
    flags = read_cpu_flags() if flags is None else flags
    choice = decide_cpu_precision(requested, flags, lambda: probe_bf16(runtime))
    log_event(log, "model_precision", requested=requested, **choice.as_fields())
    return choice
