"""What a bench run is asked to do, and what it found."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    output: Path
    quick: bool = False
    device: str = "auto"
    precision: str = "auto"
    precisions: Sequence[str] = ()
    transports: Sequence[str] = ("kafka-python", "confluent")
    model: Path | None = None
    random_arch: str | None = None
    tokenizer: Path | None = None
    bootstrap_servers: str | None = None
    messages: int | None = None
    words: int = 24
    batch_sizes: Sequence[int] = ()
    setfit_python: str | None = None
    stages: Sequence[str] = ("bare", "precision", "pipeline", "naive", "setfit", "latency")
    stage_timeout_s: float = 120.0


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
