"""setfit 1.2.0 loads a model trained with a non-default recipe: the centroid blend is folded
into an ordinary LogisticRegression head, so setfit's probabilities equal ours (±1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_classifier.model.format import save_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import TrainingConfig, train_model
from tests.fixtures.models import TRAIN_EXAMPLES
from tests.integration.test_model_setfit_interop import TEXTS, setfit_predict_proba

pytestmark = pytest.mark.integration


def test_setfit_reads_a_centroid_recipe_model(minilm_path: Path, tmp_path: Path) -> None:
    config = TrainingConfig(recipe="combined", head_only=True, show_progress_bar=False)
    bundle = train_model(TRAIN_EXAMPLES, minilm_path, config, device="cpu")
    assert bundle.metadata.params["centroid_weight"] == 0.5
    model_dir = save_model(bundle, tmp_path / "model")
    theirs = setfit_predict_proba(model_dir, TEXTS)
    ours = ModelRuntime.load(model_dir, device="cpu", precision="fp32").predict_proba(TEXTS)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
