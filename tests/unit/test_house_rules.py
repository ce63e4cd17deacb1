"""The house rules a green test run must show: layers (import-linter, contracts in
pyproject.toml), lint and format (ruff), types (mypy --strict), module size, and a serving
loop that imports neither the model stack nor a Kafka client."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MAX_MODULE_LINES = 450
# cli.py: argument parsing and short handlers only.
LONG_MODULES = {"cli.py"}


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install the dev extra (bash .ci/setup-tests)")
    return found


def _run(*command: str) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )


def test_layers_point_down() -> None:
    _run(_tool("lint-imports"))


def test_ruff_lint_and_format() -> None:
    _run(_tool("ruff"), "check", "stream_classifier", "tests", "benchmarks")
    _run(_tool("ruff"), "format", "--check", "stream_classifier", "tests", "benchmarks")


def test_mypy_strict() -> None:
    _run(_tool("mypy"), "stream_classifier")


def test_no_package_module_is_too_long() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in (ROOT / "stream_classifier").rglob("*.py")
        if path.name not in LONG_MODULES
        and (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these by job (over {MAX_MODULE_LINES} lines): {long}"


def test_the_serving_loop_imports_no_model_stack_and_no_client() -> None:
    heavy = ("torch", "sentence_transformers", "kafka", "confluent_kafka")
    probe = f"import sys, stream_classifier.stream.service\nprint([m for m in {heavy} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
