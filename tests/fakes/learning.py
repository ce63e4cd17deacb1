"""Stand-ins for what the updates follower drives: a store whose manifest names ``v1``, and a
swapper that counts its checks and never swaps."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from stream_classifier.ops.metrics import Metrics


class ManifestStore:
    """What the updates follower reads of a store: the manifest's current version."""

    class _Manifest:
        current = "v1"

    def read(self) -> Any:
        return self._Manifest()


class CountingSwapper:
    def __init__(self) -> None:
        self.checks = 0
        self.metrics = Metrics(CollectorRegistry())

    def swap_to(self, version: str) -> bool:
        self.checks += 1
        return False
