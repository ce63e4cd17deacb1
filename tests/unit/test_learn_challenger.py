"""The challenger job scores and fits as the service will serve: at the serving truncation.

Body training truncates shorter (``retrain.train_max_seq_length``); the head-mode embeddings
and the gate's scores must not, or the gate compares models on inputs the service never
feeds them, and a head-mode challenger is served on embeddings it was not fitted on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_classifier.config import Settings
from stream_classifier.learn.challenger import _train_and_score, score_probabilities, write_examples
from stream_classifier.learn.retrainer import job_spec
from stream_classifier.model.calibration import calibrate_from
from stream_classifier.model.examples import Example
from stream_classifier.model.format import load_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import fit_head

FILLER = " ".join(f"word{i}" for i in range(60))  # pushes the label cue past a short truncation


def _long(examples: list[tuple[str, str]]) -> list[Example]:
    return [Example(f"{FILLER} {text}", label) for text, label in examples]


TRAIN = _long(
    [(f"refund my invoice {i}", "billing") for i in range(6)]
    + [(f"parcel still not delivered {i}", "shipping") for i in range(6)]
)
HOLDOUT = _long([("charge on my card", "billing"), ("where is my package", "shipping")] * 2)


def test_head_mode_fits_and_scores_at_the_serving_truncation(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_examples(tmp_path / "train.jsonl", TRAIN)
    write_examples(tmp_path / "holdout.jsonl", HOLDOUT)
    settings = Settings(model={"device": "cpu"}, retrain={"mode": "head", "train_max_seq_length": 8})
    spec = job_spec(settings, tiny_model_dir, tmp_path / "cache")
    assert (spec.max_seq_length, spec.training["max_seq_length"]) == (None, 8)
    result = _train_and_score(spec, tmp_path)

    serving = ModelRuntime(load_model(tiny_model_dir), device="cpu")
    assert serving.max_seq_length > 8
    expected = fit_head(serving.embed([e.text for e in TRAIN]), [e.label for e in TRAIN], spec.seed)
    challenger = load_model(tmp_path / "model")
    np.testing.assert_allclose(challenger.head.coef, expected.coef, rtol=1e-5, atol=1e-7)

    # The coefficients are fit_head's; the temperature was fitted on the held-out split.
    truth = [e.label for e in HOLDOUT]
    holdout_embeddings = serving.embed([e.text for e in HOLDOUT])
    assert challenger.head.temperature == pytest.approx(
        calibrate_from(expected, holdout_embeddings, truth, {})[0].temperature, rel=1e-3
    )
    assert result.calibration["source"] == "held-out"
    assert result.calibration["temperature"] == pytest.approx(challenger.head.temperature, rel=1e-5)
    served = serving.predict_proba([e.text for e in HOLDOUT])
    champion_scores = result.scores["champion"]["holdout"]
    assert champion_scores == pytest.approx(score_probabilities(serving.labels, served, truth), abs=1e-5)
    assert {"macro_f1", "accuracy", "ece", "log_loss"} <= result.scores["challenger"]["holdout"].keys()
