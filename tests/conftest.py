"""Shared fixtures: the real broker (Tansu) and the models (real MiniLM, tiny random BERT).

Collect guards, so that ``pytest -m gpu tests`` on a GPU machine never aborts at collection:

- without the serving stack, only tests/gpu is collected, and the report header says why;
  its tests skip, naming what is missing;
- under ``-m gpu``, a test module that cannot be imported for want of a package is reported
  as skipped, naming the package (in every other run it stays a collection error).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Generator

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


_NO_MODULE = re.compile(r"No module named '([^']+)'|import of (\S+) halted")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.failed and isinstance(collector, pytest.Module) and collector.config.option.markexpr == "gpu":
        found = _NO_MODULE.search(str(report.longrepr))
        if found:
            name = found.group(1) or found.group(2)
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: {name} is not installed here")
    return report
