"""Shared fixtures: the real broker (Tansu) and the models (real MiniLM, tiny random BERT).

Collect guard: on a machine without the serving stack (a bare GPU machine running
``pytest -m gpu tests``), only tests/gpu is collected, and the report header says why; its
tests skip, naming what is missing, instead of the whole run aborting at collection.
"""

from __future__ import annotations

import importlib.util

import pytest

# What every tier outside tests/gpu imports (the broker fixtures and the config included).
_SERVING_STACK = ("pydantic", "pydantic_settings", "kafka", "yaml", "prometheus_client", "sklearn")
MISSING = [name for name in _SERVING_STACK if importlib.util.find_spec(name) is None]

pytest_plugins = ["tests.fixtures.models"]
if MISSING:
    collect_ignore_glob = ["unit/*", "integration/*", "faults/*", "fixtures/*", "fakes/*"]
else:
    pytest_plugins += ["tests.fixtures.broker", "tests.fixtures.kafka_broker"]


def pytest_report_header(config: pytest.Config) -> str | None:
    if not MISSING:
        return None
    return (
        f"collected tests/gpu only: {', '.join(MISSING)} missing here "
        "(install the project, or carry its wheels: benchmarks/gpu_wheels.sh)"
    )
