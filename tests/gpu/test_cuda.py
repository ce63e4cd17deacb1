"""The CUDA paths on a real GPU (marked ``gpu``; run by benchmarks/gpu_check.sh).

Here, without a GPU, every test skips with its reason. On a GPU machine they check what the
CPU tier can only simulate: a real out-of-memory (``set_per_process_memory_fraction``) that
the split path recovers from, GPU memory freed by a swap with the garbage collector off, a
short fine-tune and the challenger job on CUDA, a real device-side assert classified as fatal,
and the precisions against fp32.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pydantic", reason="the project's dependencies are missing (benchmarks/gpu_wheels.sh)")

from prometheus_client import CollectorRegistry

from stream_classifier.learn.challenger import JobSpec, run_job, write_examples
from stream_classifier.model.accelerator import cuda_auto_precision
from stream_classifier.model.format import load_model
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import TrainingConfig, train_model
from stream_classifier.ops.metrics import Metrics
from stream_classifier.samples import build_random_body
from stream_classifier.stream.compute import ComputeWorker
from tests.fixtures.models import TRAIN_EXAMPLES
from tests.gpu.conftest import TOKENIZER

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)"),
]
AMP_TOLERANCE = 0.01  # docs/models.md, "Inference runtime"
TEXTS = [e.text for e in TRAIN_EXAMPLES] + ["ok", "a much longer message about a refund " * 6, ""]


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    torch.cuda.empty_cache()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "auto"])
def test_precisions_on_cuda_stay_within_tolerance(minilm_sized_model: Path, precision: str) -> None:
    reference = ModelRuntime.load(minilm_sized_model, device="cpu", precision="fp32").predict_proba(TEXTS)
    capability = torch.cuda.get_device_capability()
    if precision == "bf16" and cuda_auto_precision(capability) != "bf16":
        pytest.skip(f"compute capability {capability} has no native bf16")
    runtime = ModelRuntime.load(minilm_sized_model, device="cuda", precision=precision, token_budget=64)
    if precision == "auto":
        assert runtime.precision == cuda_auto_precision(capability)
    runtime.warmup()
    got = runtime.predict_proba(TEXTS)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - reference).max() <= (1e-4 if precision == "fp32" else AMP_TOLERANCE)
    assert runtime.prepare(["x"]).chunks[0].features["input_ids"].is_pinned()


def test_a_real_oom_is_split_and_recovered(minilm_sized_model: Path) -> None:
    runtime = ModelRuntime.load(
        minilm_sized_model, device="cuda", precision="fp32", token_budget=10**7, max_seq_length=128
    )
    prepared = runtime.prepare(["word " * 200] * 512)  # one chunk of 512 x 128 tokens
    assert len(prepared.chunks) == 1
    rows: list[int] = []
    real = runtime._classify

    def counting(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        rows.append(int(features["input_ids"].shape[0]))
        return real(features, autocast)  # type: ignore[return-value]

    runtime._classify = counting  # type: ignore[method-assign]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    expected = runtime.infer(prepared)
    peak = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # Room for the weights and 60 % of the whole pass's peak: the whole pass cannot fit, its
    # halves (or quarters) can, once the failed pass's memory is freed.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 0.6 * peak) / total)
    rows.clear()
    try:
        got = runtime.infer(prepared)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert rows[0] == 512 and min(rows) > 1 and max(rows[1:]) < 512
    assert sum(r for r in rows if r < 512) >= 512
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_swap_frees_the_old_models_gpu_memory_with_gc_off(minilm_sized_model: Path, no_gc: None) -> None:
    before = torch.cuda.memory_allocated()
    old = ModelRuntime.load(minilm_sized_model, device="cuda")
    old.warmup()
    weights = torch.cuda.memory_allocated() - before
    new = ModelRuntime.load(minilm_sized_model, device="cuda")
    worker: ComputeWorker[int] = ComputeWorker(old, Metrics(CollectorRegistry()), depth=2)
    worker.submit([0], ["prepared for the old model"])
    worker.swap(new)
    worker.start()
    try:
        result = worker.take(block=True, timeout_s=120)
        assert result is not None and result.classifier is new
        del old, result
        kept = torch.cuda.memory_allocated() - before
    finally:
        worker.stop(10)
    assert weights > 0 and kept < 1.5 * weights  # the new model's weights only, not both


def test_a_short_fine_tune_on_cuda(tmp_path: Path) -> None:
    body = build_random_body("minilm", TOKENIZER, tmp_path / "body", max_seq_length=64)
    config = TrainingConfig(
        num_iterations=2, epochs=1, batch_size=8, max_steps=4, max_seq_length=32, show_progress_bar=False
    )
    untrained = load_model_body_weight(body)
    bundle = train_model(TRAIN_EXAMPLES, body, config, device="cuda")
    trained = next(bundle.body.parameters()).detach().float().cpu()
    assert not torch.equal(trained, untrained)  # the body took optimiser steps
    got = ModelRuntime(bundle, device="cuda").predict_proba(TEXTS)
    assert got.shape == (len(TEXTS), 3) and np.isfinite(got).all()


def load_model_body_weight(body: Path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return next(SentenceTransformer(str(body), device="cpu").parameters()).detach().float().clone()


@pytest.mark.parametrize("mode", ["head", "full"])
def test_the_challenger_job_on_cuda_with_a_memory_share(
    minilm_sized_model: Path, tmp_path: Path, mode: str
) -> None:
    spec = JobSpec(
        mode=mode,  # type: ignore[arg-type]
        champion_dir=str(minilm_sized_model),
        version=f"v-gpu-{mode}",
        device="cuda",
        gpu_memory_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
        training={"num_iterations": 2, "epochs": 1, "batch_size": 8, "max_steps": 4, "max_seq_length": 32},
    )
    (tmp_path / "job.json").write_text(json.dumps(spec.__dict__), encoding="utf-8")
    write_examples(tmp_path / "train.jsonl", TRAIN_EXAMPLES)
    write_examples(tmp_path / "holdout.jsonl", TRAIN_EXAMPLES[::2])
    child = multiprocessing.get_context("spawn").Process(target=run_job, args=(str(tmp_path),))
    child.start()
    child.join(240)
    error = tmp_path / "error.json"
    assert child.exitcode == 0, error.read_text() if error.is_file() else child.exitcode
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["version"] == f"v-gpu-{mode}" and "holdout" in result["scores"]["challenger"]
    assert load_model(tmp_path / "model").labels == ["billing", "shipping", "tech"]
    if mode == "head":  # keyed by how the body runs, not by the body alone
        assert len(list((tmp_path / "cache").glob("*-cuda_0-*-128.npz"))) == 1


DEVICE_ASSERT = """
import sys
from stream_classifier.errors import DeviceFailedError
from stream_classifier.model.runtime import ModelRuntime
runtime = ModelRuntime.load(sys.argv[1], device="cuda", precision="fp32")
prepared = runtime.prepare(["hello world"])
prepared.chunks[0].features["input_ids"][0, 1] = 10**6  # past the vocabulary: a device-side assert
try:
    runtime.infer(prepared)
except DeviceFailedError as exc:
    print("fatal:", exc)
    sys.exit(exc.exit_code)
print("no error")
"""


def test_a_real_device_side_assert_is_fatal(minilm_sized_model: Path) -> None:
    # In a child process: a device-side assert leaves the CUDA context unusable for good.
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_ASSERT, str(minilm_sized_model)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 3, done.stdout + done.stderr[-2000:]
    assert "context is unusable" in done.stdout
