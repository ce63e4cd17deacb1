"""The train, eval and predict commands end to end (JSON out, clear errors, no tracebacks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_classifier.cli import main
from tests.fixtures.models import TRAIN_EXAMPLES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows: list[dict[str, object]] = [
        {"text": e.text, "label": e.label, "id": i} for i, e in enumerate(TRAIN_EXAMPLES)
    ]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.csv"
    path.write_text(
        "text,label\nrefund the double charge,billing\nmy parcel is lost,shipping\n"
        "the app will not start,tech\nI want to say thanks,praise\n",
        encoding="utf-8",
    )
    return path


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained_dir(
    train_file: Path, eval_file: Path, tiny_body_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, object]]:
    output = tmp_path_factory.mktemp("cli") / "model"
    capture = tmp_path_factory.mktemp("out") / "stdout.txt"
    with capture.open("w") as handle:
        saved, sys.stdout = sys.stdout, handle
        try:
            code = main(
                [
                    "train", "--data", str(train_file), "--base-model", str(tiny_body_path),
                    "--output", str(output), "--eval-data", str(eval_file), "--num-iterations", "1",
                    "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--seed", "7",
                    "--device", "cpu",
                ]
            )  # fmt: skip
        finally:
            sys.stdout = saved
    assert code == 0
    (summary,) = _json_lines(capture.read_text())
    return output, summary


def test_train_writes_the_model_and_a_json_summary(trained_dir: tuple[Path, dict[str, object]]) -> None:
    output, summary = trained_dir
    assert summary["labels"] == ["billing", "shipping", "tech"]
    assert summary["examples"] == len(TRAIN_EXAMPLES)
    assert isinstance(summary["training_seconds"], float)
    evaluation = summary["eval"]
    assert isinstance(evaluation, dict) and evaluation["n"] == 4
    assert evaluation["unknown_labels"] == ["praise"]
    metadata = json.loads((output / "model_metadata.json").read_text())
    assert metadata["version"] == summary["version"]
    assert metadata["metrics"]["eval"]["n"] == 4
    assert metadata["params"]["seed"] == 7
    # Calibrated on --eval-data (its three known-label rows; "praise" left out of the fit).
    calibration = summary["calibration"]
    assert isinstance(calibration, dict) and calibration["source"] == "held-out"
    assert calibration["examples"] == 4
    head = json.loads((output / "head.json").read_text())
    assert head.get("temperature", 1.0) == pytest.approx(calibration["temperature"], rel=1e-5)


def test_eval_prints_metrics(
    trained_dir: tuple[Path, dict[str, object]], eval_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, summary = trained_dir
    assert main(["eval", "--model", str(output), "--data", str(eval_file), "--device", "cpu"]) == 0
    (result,) = _json_lines(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "n", "per_class"} <= result.keys()
    assert result["n"] == 4
    assert result["version"] == summary["version"]
    assert 0.0 <= result["ece"] <= 1.0 and result["log_loss"] > 0.0
    per_class = result["per_class"]
    assert isinstance(per_class, dict)
    assert per_class["praise"]["n"] == 1 and per_class["praise"]["recall"] == 0.0
    assert sum(c["n"] for c in per_class.values()) == 4


def test_train_without_eval_data_calibrates_out_of_fold_and_fits_thresholds(
    train_file: Path, tiny_body_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "model"
    args = [
        "train", "--data", str(train_file), "--base-model", str(tiny_body_path), "--output", str(output),
        "--num-iterations", "1", "--epochs", "1", "--batch-size", "8", "--max-steps", "1",
        "--device", "cpu", "--target-precision", "billing=0.0",
    ]  # fmt: skip
    assert main(args) == 0
    (summary,) = _json_lines(capsys.readouterr().out)
    calibration = summary["calibration"]
    assert isinstance(calibration, dict) and calibration["source"] == "cross-validation"
    assert calibration["examples"] == len(TRAIN_EXAMPLES)
    # 4 billing examples: fewer than the 10 predictions a fitted threshold needs, so none.
    assert calibration["thresholds"] == {}
    assert "thresholds" not in json.loads((output / "head.json").read_text())
    assert main([*args[:6], str(tmp_path / "other"), "--target-precision", "billing"]) == 2
    assert "LABEL=PRECISION" in capsys.readouterr().err


def test_predict_arguments(
    trained_dir: tuple[Path, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    output, _ = trained_dir
    assert main(["predict", "--model", str(output), "--device", "cpu", "first text", "second"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 2
    for row in rows:
        probabilities = row["probabilities"]
        assert isinstance(probabilities, dict)
        assert set(probabilities) == {"billing", "shipping", "tech"}
        assert row["label"] == max(probabilities, key=lambda k: probabilities[k])
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)


def test_predict_stdin_through_python_m(trained_dir: tuple[Path, dict[str, object]]) -> None:
    output, _ = trained_dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "stream_classifier", "predict", "--model", str(output), "--device", "cpu"],
        input="line one\n\nline two\nline three\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(_json_lines(done.stdout)) == 3


def test_bad_data_file_is_a_clear_error_without_traceback(
    tmp_path: Path, tiny_body_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": "a"}, {"text": 5, "label": "b"}])
    args = ["train", "--data", str(bad), "--base-model", str(tiny_body_path), "--output", str(tmp_path / "m")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: 'text' is missing or not a string" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_skip_bad_rows_reports_the_count(
    trained_dir: tuple[Path, dict[str, object]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, _ = trained_dir
    data = tmp_path / "eval.jsonl"
    data.write_text('{"text": "refund please", "label": "billing"}\n{broken\n', encoding="utf-8")
    assert main(["eval", "--model", str(output), "--data", str(data), "--device", "cpu"]) == 1
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err
    assert (
        main(["eval", "--model", str(output), "--data", str(data), "--skip-bad-rows", "--device", "cpu"]) == 0
    )
    captured = capsys.readouterr()
    (result,) = _json_lines(captured.out)
    assert result["skipped_rows"] == 1 and result["n"] == 1
    assert f"{data}:2" in captured.err


def test_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", str(tmp_path / "none"), "x"]) == 1
    assert "no such model directory" in capsys.readouterr().err
