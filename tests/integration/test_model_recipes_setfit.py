"""setfit 1.2.0 loads a model trained with a non-default recipe: the centroid blend is folded
into an ordinary LogisticRegression head, so setfit's probabilities equal ours (±1e-4)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stream_classifier.model.format import save_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import TrainingConfig, train_model
from tests.fixtures.models import TRAIN_EXAMPLES
from tests.integration.test_model_setfit_interop import TEXTS, _setfit_python

pytestmark = pytest.mark.integration

SETFIT_READS = """
import json, sys
import numpy as np
from setfit import SetFitModel
model = SetFitModel.from_pretrained(sys.argv[1])
print(json.dumps(np.asarray(model.predict_proba(json.loads(sys.argv[2]))).tolist()))
"""


def test_setfit_reads_a_centroid_recipe_model(minilm_path: Path, tmp_path: Path) -> None:
    python = _setfit_python()
    config = TrainingConfig(recipe="combined", head_only=True, show_progress_bar=False)
    bundle = train_model(TRAIN_EXAMPLES, minilm_path, config, device="cpu")
    assert bundle.metadata.params["centroid_weight"] == 0.5
    model_dir = save_model(bundle, tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [python, "-c", SETFIT_READS, str(model_dir), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    ours = ModelRuntime.load(model_dir, device="cpu", precision="fp32").predict_proba(TEXTS)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
