"""Models for the CUDA tests, built offline from what the repository holds.

Random-init bodies (``samples.build_random_body``) with the repository's WordPiece tokenizer
(``benchmarks/tokenizer``) and a head fitted on :data:`tests.fixtures.models.TRAIN_EXAMPLES`:
no download, no package beyond the project's dependencies, no environment variable. Their
predictions mean nothing; what these tests check (tolerances, memory, recovery) does not
depend on them. The project's own imports stay inside the fixtures, so that this module
imports on a machine without them (the tests then skip, saying what is missing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TOKENIZER = Path(__file__).resolve().parents[2] / "benchmarks" / "tokenizer"


def build_gpu_model(arch: str, target: Path) -> Path:
    """A model directory on a random ``arch`` body (head fitted on the CPU, body untouched)."""
    from stream_classifier.model.format import save_model
    from stream_classifier.model.training import TrainingConfig, train_model
    from stream_classifier.samples import build_random_body
    from tests.fixtures.models import TRAIN_EXAMPLES

    body = build_random_body(arch, TOKENIZER, target.parent / f"{target.name}-body", max_seq_length=128)
    config = TrainingConfig(head_only=True, show_progress_bar=False)
    return save_model(train_model(TRAIN_EXAMPLES, body, config, device="cpu"), target)


@pytest.fixture(scope="session")
def minilm_sized_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpu_model("minilm", tmp_path_factory.mktemp("gpu-minilm") / "model")
