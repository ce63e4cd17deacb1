"""Interop with the real setfit library, both ways (±1e-4), when a Python with setfit is at hand.

A calibrated directory (a temperature and thresholds in head.json) reads in setfit as the
uncalibrated model: setfit's probabilities are our temperature-1 ones, its labels ours.

setfit is not a dependency; it lives in its own environment (the parity benchmark's
``.venv-setfit``, or any interpreter named by ``SETFIT_PYTHON``). Without one the test skips
and says so; ``tests/unit/test_model_format.py`` still checks setfit's documented layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream_classifier.model.format import load_model, save_model
from stream_classifier.model.runtime import ModelRuntime

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["I was charged twice", "my parcel is late", "the app crashes", "hello there"]

SETFIT_SIDE = """
import json, sys
import numpy as np
from datasets import Dataset
from setfit import SetFitModel, Trainer, TrainingArguments

ours_dir, base, out_dir, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
calibrated = SetFitModel.from_pretrained(sys.argv[5])
ours = SetFitModel.from_pretrained(ours_dir)
rows = [json.loads(line) for line in open(f"{ours_dir}/training_examples.jsonl")]
data = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
model = SetFitModel.from_pretrained(base, labels=sorted({r["label"] for r in rows}))
args = TrainingArguments(batch_size=8, num_iterations=1, max_steps=2, num_epochs=1)
Trainer(model=model, args=args, train_dataset=data).train()
model.save_pretrained(out_dir)
print(json.dumps({
    "ours_by_setfit": np.asarray(ours.predict_proba(texts)).tolist(),
    "calibrated_by_setfit": np.asarray(calibrated.predict_proba(texts)).tolist(),
    "calibrated_labels_by_setfit": [str(label) for label in calibrated.predict(texts)],
    "setfit_by_setfit": np.asarray(model.predict_proba(texts)).tolist(),
}))
"""


# Finds setfit without importing it (an import costs ~10 s); a setfit that is there but
# cannot be imported fails the test that runs it, with its traceback.
_HAS_SETFIT = "import importlib.util, sys; sys.exit(importlib.util.find_spec('setfit') is None)"


@functools.cache
def _setfit_python() -> str:
    candidates = [os.environ.get("SETFIT_PYTHON", ""), str(REPO / ".venv-setfit" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            done = subprocess.run([candidate, "-c", _HAS_SETFIT], capture_output=True, check=False)
            if done.returncode == 0:
                return candidate
    pytest.skip("no Python with setfit: set SETFIT_PYTHON (or create .venv-setfit) to run this interop test")


SETFIT_READS = """
import json, sys
import numpy as np
from setfit import SetFitModel
model = SetFitModel.from_pretrained(sys.argv[1])
print(json.dumps(np.asarray(model.predict_proba(json.loads(sys.argv[2]))).tolist()))
"""


def setfit_predict_proba(model_dir: Path, texts: list[str]) -> np.ndarray:
    """setfit's own ``predict_proba`` of ``model_dir`` (skips without a Python that has setfit)."""
    done = subprocess.run(
        [_setfit_python(), "-c", SETFIT_READS, str(model_dir), json.dumps(texts)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.array(json.loads(done.stdout.strip().splitlines()[-1]))


def test_setfit_reads_ours_and_we_read_setfits(
    minilm_model_dir: Path, minilm_path: Path, tmp_path: Path
) -> None:
    python = _setfit_python()
    setfit_dir = tmp_path / "setfit-saved"
    bundle = load_model(minilm_model_dir)
    label = bundle.labels[0]
    plain_head = bundle.head
    bundle.head = dataclasses.replace(plain_head, temperature=2.5, thresholds={label: 0.8})
    calibrated_dir = save_model(bundle, tmp_path / "calibrated")
    script = tmp_path / "setfit_side.py"
    script.write_text(SETFIT_SIDE, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [
            python,
            str(script),
            str(minilm_model_dir),
            str(minilm_path),
            str(setfit_dir),
            json.dumps(TEXTS),
            str(calibrated_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # setfit's Trainer writes checkpoints/ into its working directory
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    ours = ModelRuntime.load(minilm_model_dir, device="cpu", precision="fp32").predict_proba(TEXTS)
    np.testing.assert_allclose(np.array(result["ours_by_setfit"]), ours, atol=1e-4)
    calibrated = ModelRuntime.load(calibrated_dir, device="cpu", precision="fp32")
    assert calibrated.thresholds == {label: 0.8}
    served = calibrated.predict_proba(TEXTS)
    assert not np.allclose(served, ours, atol=1e-3)  # we publish the calibrated probabilities ...
    np.testing.assert_allclose(np.array(result["calibrated_by_setfit"]), ours, atol=1e-4)  # setfit: not
    assert result["calibrated_labels_by_setfit"] == calibrated.predict(TEXTS)
    theirs = ModelRuntime.load(setfit_dir, device="cpu", precision="fp32")
    assert theirs.labels == ["billing", "shipping", "tech"]
    np.testing.assert_allclose(theirs.predict_proba(TEXTS), np.array(result["setfit_by_setfit"]), atol=1e-4)
    assert sys.executable != python  # setfit never ran in our own environment
