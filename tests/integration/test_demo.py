"""`stream-classifier demo` end to end, as a user runs it: a subprocess, the real embedded
broker, the real service and (for --quick) a real MiniLM training run on the bundled sample."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
DEAD_LETTER_REASONS = ("invalid_json", "missing_text", "empty_text", "invalid_utf8", "null_value")


def _command(*args: str) -> list[str]:
    script = shutil.which("stream-classifier", path=str(Path(sys.executable).parent))
    return [script, *args] if script else [sys.executable, "-m", "stream_classifier", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name in list(env):
        if name.startswith("STREAM_CLASSIFIER_"):
            del env[name]  # the demo runs on its defaults here
    return env


class _Lines:
    """A subprocess's stdout, read on a thread so that the test can wait with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout
        threading.Thread(
            target=lambda: [*map(self._queue.put, stdout), self._queue.put(None)], daemon=True
        ).start()

    def until(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        pytest.fail(f"no line matching {pattern!r}; output so far:\n{''.join(self.seen)}")


@pytest.fixture
def demo_follow() -> Iterator[tuple[subprocess.Popen[str], _Lines]]:
    process = subprocess.Popen(
        _command("demo", "--quick", "--messages", "60", "--follow"),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process, _Lines(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_quick_demo_trains_streams_shows_metrics_and_stops_on_ctrl_c(
    demo_follow: tuple[subprocess.Popen[str], _Lines],
) -> None:
    process, lines = demo_follow
    lines.until(r"embedded Tansu at 127\.0\.0\.1:\d+", timeout_s=60)
    lines.until(r"trained in [\d.]+ s: version \S+", timeout_s=400)
    metrics_url = lines.until(r"(http://127\.0\.0\.1:\d+/metrics)", timeout_s=60).group(1)
    lines.until(r"\[(ok  |MISS)\] (spam|ham) +p=0\.\d\d", timeout_s=120)
    lines.until(r"result +60/60 classified", timeout_s=300)
    accuracy = float(lines.until(r"accuracy ([\d.]+)% against the sample's labels", timeout_s=5).group(1))
    assert accuracy >= 60.0, "even the quick model separates spam from ham better than chance"
    reasons = lines.until(r"dead letters 5: (.*)", timeout_s=5).group(1)
    assert all(f"{reason} 1" in reasons for reason in DEAD_LETTER_REASONS)
    lines.until(r"following", timeout_s=30)

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        exposition = response.read().decode()
    predicted = sum(
        float(m.group(1))
        for m in re.finditer(r"^stream_classifier_predictions_total\{[^}]*\} (\S+)$", exposition, re.M)
    )
    assert predicted == 60
    for reason in DEAD_LETTER_REASONS:
        assert re.search(
            rf'^stream_classifier_dead_letters_total\{{reason="{reason}"\}} 1\.0$', exposition, re.M
        )

    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(timeout=60) == 0
    lines.until(r"stopping +service, HTTP server, broker", timeout_s=5)


def _run_to_completion(args: tuple[str, ...], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``stream-classifier *args`` run to its end, its output captured as text."""
    return subprocess.run(
        _command(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_demo_serves_a_given_model_and_exits_by_itself(tiny_model_dir: Path) -> None:
    result = _run_to_completion(("demo", "--model", str(tiny_model_dir), "--messages", "20"), timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"loaded {tiny_model_dir}" in result.stdout
    assert "result    20/20 classified" in result.stdout
    assert "dead letters 5:" in result.stdout
    assert "Traceback" not in result.stderr


def test_demo_with_an_unreachable_cluster_fails_with_a_clear_message() -> None:
    result = _run_to_completion(
        (
            "demo",
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--connect-timeout",
            "2",
            "--model",
            "/nonexistent",
            "--messages",
            "1",
        ),
        timeout_s=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "stream-classifier demo: error:" in result.stderr
    assert "within 2 s" in result.stderr, result.stderr[-2000:]  # --connect-timeout is honoured
