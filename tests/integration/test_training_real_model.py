"""Training on the real MiniLM for a handful of steps (short texts, kept fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream_classifier.model.format import load_body, load_model, save_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import TrainingConfig, train_model
from tests.fixtures.models import TRAIN_EXAMPLES

pytestmark = pytest.mark.integration

HELD_OUT = {
    "billing": "you took money from my card twice",
    "shipping": "the box still has not been delivered",
    "tech": "the login page keeps failing with an error",
}


def test_minilm_fine_tunes_and_classifies(minilm_path: Path, tmp_path: Path) -> None:
    config = TrainingConfig(
        num_iterations=2, epochs=1, batch_size=8, max_steps=4, max_seq_length=32, show_progress_bar=False
    )
    bundle = train_model(TRAIN_EXAMPLES, minilm_path, config, device="cpu")
    assert bundle.metadata.params["body"]["steps"] == 4
    assert bundle.metadata.base_model == str(minilm_path)
    original = load_body(minilm_path)
    changed = [
        not torch.equal(a, b) for a, b in zip(original.parameters(), bundle.body.parameters(), strict=True)
    ]
    assert any(changed)  # the body was fine-tuned, not just the head

    runtime = ModelRuntime(load_model(save_model(bundle, tmp_path / "m")), device="cpu")
    predicted = runtime.predict(list(HELD_OUT.values()))
    assert predicted == list(HELD_OUT)
    probabilities = runtime.predict_proba(list(HELD_OUT.values()))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
