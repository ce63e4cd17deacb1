"""Helpers for the fault-injection suite: scale (CI or soak), input pacing, bookkeeping.

`serve` processes come from :mod:`tests.integration.service_support`.

Soak mode (``STREAM_CLASSIFIER_TEST_SOAK=1``, marker ``soak``) runs the same scenarios longer,
with the real MiniLM model; CI runs them small, with the tiny random model.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

SOAK = os.environ.get("STREAM_CLASSIFIER_TEST_SOAK") == "1"


@dataclass(frozen=True)
class Scale:
    messages: int
    kills: int
    pause_s: float
    bad_inputs: int
    real_model: bool


CI = Scale(messages=3_000, kills=5, pause_s=10.0, bad_inputs=2_000, real_model=False)
SOAK_SCALE = Scale(messages=20_000, kills=5, pause_s=30.0, bad_inputs=10_000, real_model=True)

SCALES = [
    pytest.param(CI, id="ci"),
    pytest.param(
        SOAK_SCALE,
        id="soak",
        marks=[
            pytest.mark.soak,
            pytest.mark.skipif(
                not SOAK, reason="soak mode: set STREAM_CLASSIFIER_TEST_SOAK=1 and run -m soak"
            ),
        ],
    ),
]


def model_for(scale: Scale, request: pytest.FixtureRequest) -> Path:
    """The tiny model in CI, the real MiniLM model in soak mode (fixtures built lazily)."""
    name = "minilm_model_dir" if scale.real_model else "tiny_model_dir"
    path: Path = request.getfixturevalue(name)
    return path


def message(i: int) -> bytes:
    return json.dumps({"text": f"message number {i}: where is my parcel, it is late", "id": f"m{i}"}).encode()


def output_ids(records: Iterable[Any]) -> Counter[str]:
    return Counter(json.loads(r.value)["id"] for r in records)


class PacedFeeder:
    """Produces ``message(i)`` for i in range(n) over about ``seconds``, on a thread."""

    def __init__(self, broker: str, topic: str, n: int, seconds: float) -> None:
        self._broker, self._topic, self._n, self._seconds = broker, topic, n, seconds
        self._thread = threading.Thread(target=self._run, name="paced-feeder", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> PacedFeeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            producer = KafkaProducer(bootstrap_servers=self._broker, linger_ms=5)
            started = time.monotonic()
            for i in range(self._n):
                producer.send(self._topic, value=message(i))
                ahead = started + self._seconds * (i + 1) / self._n - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.flush(timeout=120)
            producer.close()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the feeder did not finish"
        assert self.error is None, f"the feeder failed: {self.error!r}"


def seeded_rng(request: pytest.FixtureRequest) -> random.Random:
    """A random generator whose seed is printed with the test's report (to replay a failure)."""
    seed = int(os.environ.get("STREAM_CLASSIFIER_TEST_FAULT_SEED", random.randrange(1 << 30)))
    request.node.user_properties.append(("fault_seed", seed))
    sys.stderr.write(f"fault seed: {seed} (replay with STREAM_CLASSIFIER_TEST_FAULT_SEED={seed})\n")
    return random.Random(seed)
