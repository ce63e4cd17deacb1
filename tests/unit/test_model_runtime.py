"""ModelRuntime: token-budget batching restores order, OOM splitting, devices, AMP tolerance.

The CUDA branches are tested here on the CPU wherever they can be; on a real GPU by
tests/gpu/test_cuda.py (marked ``gpu``).

Documented tolerances (docs/models.md, "Inference runtime"): under AMP the
probabilities stay within ``AMP_TOLERANCE`` (absolute) of fp32; int8 mode within
``INT8_TOLERANCE``. Measured on MiniLM-L6 on the CPU: bf16 4.7e-4, fp16 4.8e-5, int8 0.010
(ONNX Runtime, per-channel int8 weights).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_classifier.config import Settings
from stream_classifier.errors import DeviceFailedError, ModelError
from stream_classifier.learn.updates import load_runtime
from stream_classifier.model import runtime as runtime_module
from stream_classifier.model.accelerator import cuda_auto_precision, is_device_failure, position_limit
from stream_classifier.model.format import load_model
from stream_classifier.model.runtime import (
    ModelRuntime,
    on_a_passing_thread,
    plan_chunks,
    resolve_device,
    resolve_precision,
)
from tests.fixtures.models import TRAIN_EXAMPLES

AMP_TOLERANCE = 0.01
# What torch raises for a CUDA error since 2.8 (a RuntimeError subclass); RuntimeError before.
ACCELERATOR_ERROR: type[RuntimeError] = getattr(torch, "AcceleratorError", RuntimeError)
INT8_TOLERANCE = 0.1
TEXTS = [e.text for e in TRAIN_EXAMPLES] + [
    "ok",
    "a much longer message about a refund for a parcel that never arrived and an app that keeps crashing",
    "",
]


@pytest.fixture(scope="module")
def tiny_runtime(tiny_model_dir: Path) -> ModelRuntime:
    return ModelRuntime.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def minilm_fp32(minilm_model_dir: Path) -> np.ndarray:
    return ModelRuntime.load(minilm_model_dir, device="cpu", precision="fp32").predict_proba(TEXTS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=80), st.integers(1, 2000))
def test_plan_chunks_covers_every_position_once_within_budget(lengths: list[int], budget: int) -> None:
    chunks = plan_chunks(lengths, budget)
    flat = sorted(int(i) for chunk in chunks for i in chunk)
    assert flat == list(range(len(lengths)))
    for chunk in chunks:
        longest = max(lengths[i] for i in chunk)
        assert len(chunk) == 1 or len(chunk) * longest <= budget
        assert [lengths[i] for i in chunk] == sorted(lengths[i] for i in chunk)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=80), st.integers(0, 500))
def test_plan_chunks_bounds_the_padding_each_longer_row_adds(lengths: list[int], pass_cost: int) -> None:
    chunks = plan_chunks(lengths, 10**9, pass_cost)
    assert sorted(int(i) for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        sizes = [lengths[i] for i in chunk]
        assert all(row * (sizes[row] - sizes[row - 1]) <= pass_cost for row in range(1, len(sizes)))


def test_plan_chunks_gives_an_outlier_its_own_pass() -> None:
    chunks = plan_chunks([30] * 20 + [150], 16_384, 128)
    assert [len(chunk) for chunk in chunks] == [20, 1]
    assert [len(chunk) for chunk in plan_chunks([30] * 20 + [150], 16_384)] == [21]


def test_token_budget_batching_restores_input_order(tiny_model_dir: Path, tiny_runtime: ModelRuntime) -> None:
    small = ModelRuntime.load(tiny_model_dir, device="cpu", token_budget=24)
    prepared = small.prepare(TEXTS)
    assert len(prepared.chunks) > 3
    assert all(c.tokens <= 24 or len(c.positions) == 1 for c in prepared.chunks)
    expected = tiny_runtime.bundle.head.predict_proba(
        tiny_runtime.bundle.body.encode(TEXTS, normalize_embeddings=tiny_runtime.bundle.normalize_embeddings)
    )
    np.testing.assert_allclose(small.infer(prepared), expected, atol=1e-5)
    np.testing.assert_allclose(tiny_runtime.predict_proba(TEXTS), expected, atol=1e-5)
    # Order, not just the set: reversing the input reverses the output.
    np.testing.assert_allclose(small.predict_proba(TEXTS[::-1]), expected[::-1], atol=1e-5)


def test_texts_are_truncated_to_the_maximum_sequence_length(tiny_model_dir: Path) -> None:
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", max_seq_length=16)
    prepared = runtime.prepare(["word " * 500, "short"])
    assert max(c.features["input_ids"].shape[1] for c in prepared.chunks) == 16
    assert runtime.infer(prepared).shape == (2, 3)


def test_cuda_oom_splits_the_batch_and_retries(
    tiny_runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = tiny_runtime.predict_proba(TEXTS)
    widest_chunk = max(len(chunk.positions) for chunk in tiny_runtime.prepare(TEXTS).chunks)
    real = tiny_runtime._classify
    calls: list[int] = []

    def oom_above_two_rows(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        rows = features["input_ids"].shape[0]
        calls.append(rows)
        if rows > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(features, autocast)

    monkeypatch.setattr(tiny_runtime, "_classify", oom_above_two_rows)
    np.testing.assert_allclose(tiny_runtime.predict_proba(TEXTS), expected, atol=1e-6)
    assert widest_chunk > 2 and max(calls) == widest_chunk  # each chunk was tried whole first
    assert sum(rows for rows in calls if rows <= 2) == len(TEXTS)  # and every text was done once


def test_oom_on_a_single_text_is_raised_not_swallowed(
    tiny_runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_oom(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> np.ndarray:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(tiny_runtime, "_classify", always_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tiny_runtime.predict_proba(["a", "b", "c"])


def test_embed_matches_sentence_transformers(tiny_runtime: ModelRuntime) -> None:
    expected = tiny_runtime.bundle.body.encode(TEXTS)
    np.testing.assert_allclose(tiny_runtime.embed(TEXTS), expected, atol=1e-5)


def test_labels_version_and_empty_input(tiny_runtime: ModelRuntime, tiny_model_dir: Path) -> None:
    assert tiny_runtime.labels == ["billing", "shipping", "tech"]
    assert tiny_runtime.version == load_model(tiny_model_dir).metadata.version
    assert tiny_runtime.predict_proba([]).shape == (0, 3)
    tiny_runtime.warmup()


def test_device_and_precision_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ModelError, match="unknown precision"):
        resolve_precision("int4", torch.device("cpu"))
    with pytest.raises(ModelError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_int8_requires_the_cpu_and_fp32(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="precision fp32"):
        ModelRuntime.load(tiny_model_dir, device="cpu", precision="bf16", quantize="int8")
    with pytest.raises(ModelError, match="unknown quantize"):
        ModelRuntime.load(tiny_model_dir, device="cpu", quantize="int4")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_on_cpu_stays_within_tolerance(
    minilm_model_dir: Path, minilm_fp32: np.ndarray, precision: str
) -> None:
    runtime = ModelRuntime.load(minilm_model_dir, device="cpu", precision=precision)
    got = runtime.predict_proba(TEXTS)
    assert np.abs(got - minilm_fp32).max() <= AMP_TOLERANCE
    assert got.dtype == np.float32


def test_int8_mode_stays_within_tolerance(minilm_model_dir: Path, minilm_fp32: np.ndarray) -> None:
    runtime = ModelRuntime.load(minilm_model_dir, device="cpu", quantize="int8")
    got = runtime.predict_proba(TEXTS)
    assert got.dtype == np.float32
    assert np.abs(got - minilm_fp32).max() <= INT8_TOLERANCE
    assert np.abs(got - minilm_fp32).max() > 0  # int8 weights, not the fp32 body
    # The export borrowed the body (eager attention, eval mode): it is left as it was found.
    assert not any(module.training for module in runtime.bundle.body.modules())
    fp32 = ModelRuntime(runtime.bundle, device="cpu", precision="fp32")
    np.testing.assert_allclose(fp32.predict_proba(TEXTS), minilm_fp32, atol=1e-6)


def test_int8_mode_normalises_embeddings_when_the_model_says_so(tiny_model_dir: Path) -> None:
    bundle = dataclasses.replace(load_model(tiny_model_dir), normalize_embeddings=True)
    int8 = ModelRuntime(bundle, device="cpu", quantize="int8")
    fp32 = ModelRuntime(bundle, device="cpu", precision="fp32")
    got, want = int8.embed(TEXTS), fp32.embed(TEXTS)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert 0 < np.abs(got - want).max() <= INT8_TOLERANCE
    # The head sees exactly these embeddings.
    np.testing.assert_allclose(int8.predict_proba(TEXTS), bundle.head.predict_proba(got), atol=1e-6)


def test_int8_mode_without_onnxruntime_says_what_to_install(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ModelError, match=r"stream-classifier\[int8\]"):
        ModelRuntime.load(tiny_model_dir, device="cpu", quantize="int8")


def test_a_passing_thread_returns_the_result_or_raises_the_error_and_ends() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert on_a_passing_thread(work) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise ModelError("broken model directory")

    with pytest.raises(ModelError, match="broken model directory"):
        on_a_passing_thread(fail)


def test_serving_loads_and_warms_the_model_on_a_passing_thread(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The serving thread's CPU pool must stay the process's only one (on_a_passing_thread).
    threads: list[threading.Thread] = []
    real_warmup = ModelRuntime.warmup

    def warmup(self: ModelRuntime) -> None:
        threads.append(threading.current_thread())
        real_warmup(self)

    monkeypatch.setattr(ModelRuntime, "warmup", warmup)
    settings = Settings(model={"device": "cpu", "precision": "fp32"})
    runtime = load_runtime(settings, tiny_model_dir)
    assert runtime.labels == ["billing", "shipping", "tech"]
    assert threads and threads[0] is not threading.current_thread() and not threads[0].is_alive()


@pytest.fixture
def no_gc() -> object:
    """The garbage collector off: what is freed is freed by reference counting alone."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_oom_halves_run_after_the_failed_pass_is_freed(
    tiny_runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, no_gc: object
) -> None:
    # The handler is left before the halves run: the exception's traceback no longer holds the
    # failed pass's frames, nor the (device) memory their locals point to (PyTorch FAQ, "My out
    # of memory exception handler can't allocate memory").
    expected = tiny_runtime.predict_proba(TEXTS)
    real = tiny_runtime._classify
    failed_passes: list[weakref.ref[torch.Tensor]] = []
    alive_when_retrying: list[int] = []

    def oom_above_two_rows(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        rows = features["input_ids"].shape[0]
        if rows > 2:
            activations = torch.empty(rows, 4096)  # what the failed pass allocated
            failed_passes.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        alive_when_retrying.append(sum(ref() is not None for ref in failed_passes))
        return real(features, autocast)

    monkeypatch.setattr(tiny_runtime, "_classify", oom_above_two_rows)
    np.testing.assert_allclose(tiny_runtime.predict_proba(TEXTS), expected, atol=1e-6)
    assert failed_passes and alive_when_retrying
    assert alive_when_retrying == [0] * len(alive_when_retrying)


def test_a_dropped_runtime_is_freed_without_the_garbage_collector(
    tiny_model_dir: Path, no_gc: object
) -> None:
    # A swapped-out model's weights go with its last reference, not at the next full gc pass.
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    runtime.predict_proba(TEXTS)
    runtime.embed(TEXTS)
    refs = [weakref.ref(runtime), weakref.ref(runtime.bundle.body), weakref.ref(runtime._classify)]
    del runtime
    assert [ref() for ref in refs] == [None, None, None]


def test_one_device_to_host_copy_per_batch(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunk results stay on the device; the batch comes back in one copy (one sync per batch).
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32", token_budget=24)
    prepared = runtime.prepare(TEXTS)
    assert len(prepared.chunks) > 3
    returned: list[type] = []
    real = runtime._classify

    def recording(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        values = real(features, autocast)
        returned.append(type(values))
        return values  # type: ignore[return-value]

    gathers: list[int] = []
    real_gather = runtime_module.gather

    def counting_gather(pieces: list, output: np.ndarray) -> None:  # type: ignore[type-arg]
        gathers.append(len(pieces))
        real_gather(pieces, output)

    monkeypatch.setattr(runtime, "_classify", recording)
    monkeypatch.setattr(runtime_module, "gather", counting_gather)
    runtime.infer(prepared)
    assert set(returned) == {torch.Tensor} and gathers == [len(prepared.chunks)]


def test_non_finite_amp_rows_are_computed_again_in_fp32(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32").predict_proba(TEXTS)
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp16")
    real = runtime._classify
    precise_rows: list[int] = []

    def fp16_overflows_first_row(
        features: dict[str, torch.Tensor], autocast: torch.dtype | None
    ) -> torch.Tensor:
        values: torch.Tensor = real(features, autocast)  # type: ignore[assignment]
        if autocast is None:
            precise_rows.append(values.shape[0])
            return values
        assert autocast == torch.float16
        values = values.clone()
        values[0] = float("nan")  # as an fp16 overflow makes it
        return values

    monkeypatch.setattr(runtime, "_classify", fp16_overflows_first_row)
    prepared = runtime.prepare(TEXTS)
    got = runtime.infer(prepared)
    firsts = [int(chunk.positions[0]) for chunk in prepared.chunks]
    assert np.isfinite(got).all()
    assert sum(precise_rows) == len(firsts)  # only the bad rows ran again
    np.testing.assert_allclose(got[firsts], fp32[firsts], atol=1e-6)


def test_rows_non_finite_in_fp32_too_are_returned_for_the_worker_to_fail(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="bf16")
    real = runtime._classify

    def always_nan_first_row(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        values = real(features, autocast).clone()  # type: ignore[union-attr]
        values[0] = float("nan")
        return values

    monkeypatch.setattr(runtime, "_classify", always_nan_first_row)
    got = runtime.predict_proba(TEXTS)
    assert 0 < (~np.isfinite(got).all(axis=1)).sum() < len(TEXTS)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 1), "fp16"),
        ((7, 0), "fp16"),
        ((7, 5), "fp16"),
        ((8, 0), "bf16"),
        ((8, 9), "bf16"),
        ((9, 0), "bf16"),
        ((10, 0), "bf16"),
    ],
)
def test_auto_precision_on_cuda_is_bf16_only_where_native(
    capability: tuple[int, int], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cuda_auto_precision(capability) == expected
    # is_bf16_supported() says yes for emulated bf16 too: the capability decides, not it.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    if expected == "fp16":
        with pytest.raises(ModelError, match="no native bf16"):
            resolve_precision("bf16", torch.device("cuda"))
    else:
        assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported",
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: unspecified launch failure",
        "CUDA error: misaligned address",
    ],
)
def test_device_side_cuda_errors_are_fatal(
    tiny_runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    for error in (RuntimeError(message), ACCELERATOR_ERROR(message)):
        assert is_device_failure(error)

    def failing(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        raise ACCELERATOR_ERROR(message)

    monkeypatch.setattr(tiny_runtime, "_classify", failing)
    with pytest.raises(DeviceFailedError, match="restarts with a fresh one"):
        tiny_runtime.predict_proba(["a", "b"])


def test_a_failed_device_surfacing_in_prepare_is_fatal_too(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sticky CUDA error surfaces at the next CUDA call, which may be the pinning in prepare.
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    runtime._pin = True  # as on CUDA

    def failing_pin(self: torch.Tensor, *args: object) -> torch.Tensor:
        raise ACCELERATOR_ERROR("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.Tensor, "pin_memory", failing_pin)
    with pytest.raises(DeviceFailedError, match="context is unusable"):
        runtime.prepare(["a", "b"])


def test_other_errors_are_not_device_failures(
    tiny_runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    for error in (
        RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("CUDA error: device-side assert triggered"),  # not raised by torch
    ):
        assert not is_device_failure(error)

    def failing(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")

    monkeypatch.setattr(tiny_runtime, "_classify", failing)
    with pytest.raises(RuntimeError, match="size of tensor"):
        tiny_runtime.predict_proba(["a", "b"])


def test_the_sequence_length_must_fit_the_position_embeddings(tiny_model_dir: Path) -> None:
    bundle = load_model(tiny_model_dir)
    positions = position_limit(bundle.body)
    assert positions == 512  # the tiny BERT's table; BERT has no padding offset
    bundle.body.max_seq_length = 1024  # a body config that promises more than its table holds
    with pytest.raises(
        ModelError, match=r"longer than the body's 512 position embeddings.*max_seq_length to 512"
    ):
        ModelRuntime(bundle, device="cpu", max_seq_length=600)
    with pytest.raises(ModelError, match="position embeddings"):
        ModelRuntime(bundle, device="cpu")
    assert ModelRuntime(bundle, device="cpu", max_seq_length=512).max_seq_length == 512


def test_position_limit_counts_a_roberta_style_padding_offset() -> None:
    class Embeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.position_embeddings = torch.nn.Embedding(514, 8, padding_idx=1)

    assert position_limit(torch.nn.Sequential(Embeddings())) == 512
    assert position_limit(torch.nn.Linear(2, 2)) is None


def test_full_warmup_reaches_the_token_budget_shape(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = ModelRuntime.load(
        tiny_model_dir, device="cpu", precision="fp32", token_budget=64, max_seq_length=16
    )
    shapes: list[tuple[int, int]] = []
    real = runtime._classify

    def recording(features: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
        shapes.append(tuple(features["input_ids"].shape))  # type: ignore[arg-type]
        return real(features, autocast)  # type: ignore[return-value]

    monkeypatch.setattr(runtime, "_classify", recording)
    runtime.warmup(full=False)
    assert max(rows * width for rows, width in shapes) <= 2 * 16
    assert max(width for _, width in shapes) == 16  # the longest text reaches max_seq_length
    shapes.clear()
    runtime.warmup(full=True)
    assert (4, 16) in shapes  # 64 tokens' budget / 16 = 4 rows of the longest length
