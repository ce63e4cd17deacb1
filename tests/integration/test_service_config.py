"""`stream-classifier serve` refuses bad configuration: a clear message naming the setting, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_classifier.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STREAM_CLASSIFIER_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"STREAM_CLASSIFIER_BATCHING__MAX_BATCH_SIZE": "zero"}, "batching.max_batch_size"),
        ({"STREAM_CLASSIFIER_KAFKA__AUTO_OFFSET_RESET": "newest"}, "kafka.auto_offset_reset"),
        ({"STREAM_CLASSIFIER_INPUT__FORMAT": "csv"}, "input.format"),
        ({}, "model.path"),
        (
            {
                "STREAM_CLASSIFIER_MODEL__PATH": "/m",
                "STREAM_CLASSIFIER_KAFKA__CONSUMER_PROPERTIES": '{"enable_auto_commit": true}',
            },
            "kafka.consumer_properties.enable_auto_commit",
        ),
    ],
)
def test_invalid_settings_exit_2_naming_the_setting(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2
    assert named in capsys.readouterr().err


def test_unreadable_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_the_process_exits_non_zero_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_CLASSIFIER_")}
    result = subprocess.run(
        [sys.executable, "-m", "stream_classifier", "serve"],
        env={**clean, "HF_HUB_OFFLINE": "1", "STREAM_CLASSIFIER_MODEL__PATH": str(tmp_path / "nope")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "nope" in result.stderr and "Traceback" not in result.stderr
