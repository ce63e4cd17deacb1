"""ModelRuntime: text in, class probabilities out, on the chosen device and precision.

Two steps, so that the caller can overlap them:

- :meth:`ModelRuntime.prepare` (CPU only, no model state, safe in another thread)
  tokenises with the body's fast tokenizer, truncating to the maximum sequence length,
  sorts the texts by token length and groups them into chunks (:mod:`.chunks`) whose padded
  size (rows x longest row) stays within the token budget; on the CPU, where padding costs as
  much as real tokens, a chunk also ends where a longer row would pad the rows before it by
  more than a forward pass costs (:data:`CPU_PASS_COST_TOKENS`);
- :meth:`ModelRuntime.infer` runs body + head on each chunk under
  ``torch.inference_mode`` (and autocast unless fp32) and returns ``(n, k)`` float32
  probabilities **in input order**.

Invariants:

- body and head live on one device; the head computes in float32 whatever the body's
  precision (float64 in int8 mode's numpy head);
- a batch's chunk results stay on the device until its last chunk is queued, then come back
  in one copy: one host synchronisation per batch, so the pinned, non-blocking input copies
  overlap the passes before them;
- CUDA out-of-memory on a chunk is the batch's size, not the messages' fault: the handler is
  left first (the exception and its traceback, which hold the failed pass's frames and their
  activations, are dropped), the cache emptied, then the chunk halved and retried; only a
  single text that does not fit re-raises ``torch.cuda.OutOfMemoryError`` (a capacity
  problem, never a bad message);
- under fp16/bf16 autocast, rows that come out non-finite (an fp16 overflow) are computed
  again in fp32; rows still non-finite are returned as they are (the compute worker fails
  them, never publishes them);
- a device-side CUDA error that leaves the context unusable (device assert, illegal memory
  access: :func:`~.accelerator.is_device_failure`) is raised as
  :class:`~stream_classifier.errors.DeviceFailedError`, which stops the service;
- the maximum sequence length fits the body's position embeddings (checked at load);
- precision ``auto`` is fp32 on the CPU and, on CUDA, bf16 where the device computes it
  natively (compute capability >= 8.0), else fp16; explicit ``bf16`` on CUDA needs native
  support too (always available on the CPU);
- the per-chunk computations capture the body and head, never the runtime: a swapped-out
  runtime, and with it its weights, is freed as soon as the last reference goes, without
  waiting for a garbage-collection pass;
- ``quantize="int8"`` (CPU only, fp32 around int8 weights) replaces the body by its ONNX
  Runtime int8 export (:mod:`stream_classifier.model.int8`); tokenising and chunking are
  unchanged, and the head computes in numpy (:meth:`LinearHead.predict_proba`): no torch
  operator runs per chunk, so torch's idle intra-op workers never spin on the cores ONNX
  Runtime's own threads use (a torch head cost int8 mode ~16 % on 2 cores, docs/performance.md).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from stream_classifier.errors import DeviceFailedError, ModelError
from stream_classifier.model.accelerator import (
    Precision,
    cuda_auto_precision,
    has_native_bf16,
    is_device_failure,
    position_limit,
)
from stream_classifier.model.chunks import (
    CPU_PASS_COST_TOKENS,
    DEFAULT_TOKEN_BUDGET,
    Chunk,
    PreparedBatch,
    plan_chunks,
)
from stream_classifier.model.format import ModelBundle, load_model
from stream_classifier.model.int8 import Int8Body
from stream_classifier.model.passes import (
    AUTOCAST_DTYPES,
    ChunkCompute,
    ChunkValues,
    attempt,
    gather,
    int8_computations,
    torch_computations,
)
from stream_classifier.model.precision import PrecisionChoice, choose_cpu_precision
from stream_classifier.ops.logs import log_event

__all__ = [
    "CPU_PASS_COST_TOKENS",
    "DEFAULT_TOKEN_BUDGET",
    "Chunk",
    "ModelRuntime",
    "Precision",
    "PreparedBatch",
    "on_a_passing_thread",
    "plan_chunks",
    "resolve_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)

# A fast tokenizer mutates its truncation state on each call, so concurrent calls on one tokenizer
# (runtimes may share a body) fail with 'Already borrowed': tokenisation is serialised.
_TOKENIZER_LOCK = threading.Lock()
_T = TypeVar("_T")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device if any, else the CPU; ``cuda[:N]`` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but torch sees no CUDA device: use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise ModelError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` -> fp32 on the CPU, native bf16 or else fp16 on CUDA; checks bf16 on CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return cuda_auto_precision(torch.cuda.get_device_capability(device))
    if precision not in ("fp32", "fp16", "bf16"):
        raise ModelError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "bf16" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if not has_native_bf16((major, minor)):
            raise ModelError(
                f"{device} (compute capability {major}.{minor}) has no native bf16 (emulated bf16 is "
                "slower than fp32): use fp16 or fp32"
            )
    return precision  # type: ignore[return-value]


def on_a_passing_thread(work: Callable[[], _T]) -> _T:
    """Run ``work`` on a thread that ends with it; return its result or raise its error.

    For torch work on the CPU outside the thread that serves (loading, warming, training a
    model). OpenMP (torch's CPU pool) keeps a pool of workers for every thread that ever ran a
    parallel operator, for as long as that thread lives, and libgomp cuts every pool's
    spin-wait to almost nothing once their threads outnumber the CPUs: each operator then
    wakes its workers through the kernel. With the model loaded on the main thread, the
    serving thread ran ~10 % slower on 2 cores, the CPUs 10 % idle (docs/performance.md); a
    passing thread takes its pool with it.
    """
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="torch-passing", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _cut_model_card_cycle(body: Any) -> None:
    """Drop the back-reference from sentence-transformers' model card to its model.

    The body holds its card and the card its body: a cycle that keeps the weights (on the GPU
    too) until a full garbage-collection pass. The card's reference is only read to write a
    model card, which this project never does (``create_model_card=False``).
    """
    card = getattr(body, "model_card_data", None)
    if card is not None and getattr(card, "model", None) is body:
        card.model = None


class ModelRuntime:
    """A loaded model ready for inference; see the module docstring for the invariants."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        device: str = "auto",
        precision: str = "auto",
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_seq_length: int | None = None,
        quantize: str = "none",
    ) -> None:
        if token_budget < 1:
            raise ModelError("token_budget must be positive")
        self.bundle = bundle
        self.device = resolve_device(device)
        self.precision: Precision = resolve_precision(precision, self.device)
        self.requested_precision = precision
        # The CPU's precision is settled at warm-up (model/precision.py); until then auto is fp32.
        self.precision_choice: PrecisionChoice | None = None
        self.token_budget = token_budget
        self.quantize = quantize
        body_max = bundle.body.max_seq_length or 512
        self.max_seq_length = min(max_seq_length, body_max) if max_seq_length else body_max
        positions = position_limit(bundle.body)
        if positions is not None and self.max_seq_length > positions:
            raise ModelError(
                f"the maximum sequence length {self.max_seq_length} is longer than the body's "
                f"{positions} position embeddings (longer inputs would index past them: a "
                f"device-side assert on CUDA): set model.max_seq_length to {positions} or less"
            )
        tokenizer = bundle.body.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError("the body's tokenizer is not a fast (Rust) tokenizer; convert the model first")
        self._tokenizer = tokenizer
        self._pad_values = {
            "input_ids": int(tokenizer.pad_token_id or 0),
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "attention_mask": 0,
        }
        self._pin = self.device.type == "cuda"
        self._pass_cost_tokens = CPU_PASS_COST_TOKENS if self.device.type == "cpu" else None
        self._embed, self._classify = self._place(bundle, quantize)

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        device: str = "auto",
        precision: str = "auto",
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_seq_length: int | None = None,
        quantize: str = "none",
        trusted: bool = False,
    ) -> ModelRuntime:
        started = time.perf_counter()
        runtime = cls(
            load_model(path, trusted=trusted),
            device=device,
            precision=precision,
            token_budget=token_budget,
            max_seq_length=max_seq_length,
            quantize=quantize,
        )
        log_event(
            log,
            "model_loaded",
            path=str(path),
            version=runtime.version,
            device=str(runtime.device),
            precision=runtime.precision,
            quantize=quantize,
            seconds=round(time.perf_counter() - started, 3),
        )
        return runtime

    def _place(self, bundle: ModelBundle, quantize: str) -> tuple[ChunkCompute, ChunkCompute]:
        """The per-chunk embedding and probability computations for ``quantize``."""
        _cut_model_card_cycle(bundle.body)
        if quantize == "none":
            body = bundle.body.eval().to(self.device)
            head = bundle.head.to_torch(self.device).eval()
            return torch_computations(body, head, self.device, bundle.normalize_embeddings)
        if quantize != "int8":
            raise ModelError(f"unknown quantize mode {quantize!r}: use none or int8")
        if self.device.type != "cpu":
            raise ModelError("int8 quantisation is CPU only: use device=cpu, or fp16/bf16 on CUDA")
        if self.precision != "fp32":
            raise ModelError("int8 quantisation computes in fp32 around int8 weights: use precision fp32")
        sample = self.prepare(["an int8 export sample", "a second, longer sample for the export"])
        threads = torch.get_num_threads()
        int8 = Int8Body.load(bundle.body.eval(), bundle.directory, sample.chunks[0].features, threads=threads)
        return int8_computations(int8, bundle.head, bundle.normalize_embeddings)

    # ------------------------------------------------------------------ properties

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def base_model(self) -> str:
        return str(self.bundle.metadata.base_model or "")

    @property
    def thresholds(self) -> dict[str, float]:
        """The head's fitted label -> minimum calibrated probability (empty when none were fitted)."""
        return dict(self.bundle.head.thresholds)

    # ------------------------------------------------------------------ prepare (CPU)

    def prepare(self, texts: Sequence[str]) -> PreparedBatch:
        """Tokenise, sort by length and split under the token budget (CPU only)."""
        if not texts:
            return PreparedBatch(0, [])
        with _TOKENIZER_LOCK:
            encoded = self._tokenizer(
                list(texts), truncation=True, max_length=self.max_seq_length, padding=False
            )
        columns = {key: encoded[key] for key in self._pad_values if key in encoded}
        lengths = [len(ids) for ids in columns["input_ids"]]
        try:
            chunks = [
                Chunk(positions, self._pad(columns, positions, lengths))
                for positions in plan_chunks(lengths, self.token_budget, self._pass_cost_tokens)
            ]
        except RuntimeError as exc:  # pinning is a CUDA call: a failed context can surface here first
            if is_device_failure(exc):
                raise self._device_failed(exc) from exc
            raise
        return PreparedBatch(len(texts), chunks)

    def _pad(
        self, columns: dict[str, list[list[int]]], positions: NDArray[np.int64], lengths: list[int]
    ) -> dict[str, torch.Tensor]:
        sizes = np.array([lengths[i] for i in positions], dtype=np.int64)
        filled = np.arange(int(sizes.max())) < sizes[:, None]  # row-major, as the ids are
        total = int(sizes.sum())
        features: dict[str, torch.Tensor] = {}
        for key, rows in columns.items():
            array = np.full(filled.shape, self._pad_values[key], dtype=np.int64)
            # One masked copy per column: a slice assignment per row was 30 % of prepare's
            # time on the serving I/O thread (docs/performance.md, "The pipeline's own ceiling").
            array[filled] = np.fromiter(
                itertools.chain.from_iterable(rows[i] for i in positions), dtype=np.int64, count=total
            )
            tensor = torch.from_numpy(array)
            features[key] = tensor.pin_memory() if self._pin else tensor
        return features

    # ------------------------------------------------------------------ infer (device)

    def infer(self, prepared: PreparedBatch) -> NDArray[np.float32]:
        """``(n, k)`` float32 probabilities in input order."""
        return self._run(prepared, self._classify, len(self.labels))

    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float32]:
        return self.infer(self.prepare(texts))

    def predict(self, texts: Sequence[str]) -> list[str]:
        probabilities = self.predict_proba(texts)
        return [self.labels[i] for i in probabilities.argmax(axis=1)]

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Sentence embeddings ``(n, d)`` as the head sees them (normalised if the model says so)."""
        return self._run(self.prepare(texts), self._embed, self.bundle.head.dim)

    def warmup(self, *, full: bool | None = None) -> None:
        """A short and a longest text; with ``full`` (default: on CUDA) also one pass of the
        token budget's shape (rows x max_seq_length), the largest a batch can make, so the
        allocator and the kernels (autotuning included) have seen it before traffic does.
        On the CPU with a torch body, first the precision is settled (and logged) once."""
        if self.precision_choice is None and self.device.type == "cpu" and self.quantize == "none":
            self.precision_choice = choose_cpu_precision(self, self.requested_precision)
            self.precision = self.precision_choice.precision  # type: ignore[assignment]
        longest = "warm up " * self.max_seq_length  # truncated to max_seq_length tokens
        self.predict_proba(["warm up", longest])
        if full if full is not None else self.device.type == "cuda":
            self.predict_proba([longest] * max(1, self.token_budget // self.max_seq_length))

    def _run(self, prepared: PreparedBatch, compute: ChunkCompute, width: int) -> NDArray[np.float32]:
        output = np.empty((prepared.size, width), dtype=np.float32)
        autocast = AUTOCAST_DTYPES.get(self.precision)
        try:
            with torch.inference_mode():
                pieces = [
                    p for chunk in prepared.chunks for p in self._compute_splitting(chunk, compute, autocast)
                ]
                gather(pieces, output)
                bad = np.asarray(~np.isfinite(output).all(axis=1), dtype=bool)
                if autocast is not None and bad.any():
                    log_event(
                        log,
                        "inference_fp32_recompute",
                        logging.WARNING,
                        rows=int(bad.sum()),
                        precision=self.precision,
                    )
                    again = [chunk.select(np.flatnonzero(bad[chunk.positions])) for chunk in prepared.chunks]
                    pieces = [
                        p
                        for chunk in again
                        if len(chunk.positions)
                        for p in self._compute_splitting(chunk, compute, None)
                    ]
                    gather(pieces, output)
        except RuntimeError as exc:
            if is_device_failure(exc):
                raise self._device_failed(exc) from exc
            raise
        return output

    def _device_failed(self, exc: RuntimeError) -> DeviceFailedError:
        return DeviceFailedError(
            f"the {self.device} device failed and its context is unusable ({str(exc)[:300]}): "
            "the process stops so that it restarts with a fresh one; if this repeats, check the "
            "GPU's health (nvidia-smi, the kernel log's Xid errors) and the model's inputs"
        )

    def _compute_splitting(
        self, chunk: Chunk, compute: ChunkCompute, autocast: torch.dtype | None
    ) -> Iterator[tuple[Chunk, ChunkValues]]:
        """``chunk``'s values, halving pieces that run out of memory (see the module docstring)."""
        pending = [chunk]
        while pending:
            piece = pending.pop()
            values = attempt(compute, piece, autocast)
            if values is not None:
                yield piece, values
                continue
            # Outside the handler: the failed pass's frames, and the activations they held, are gone.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log_event(
                log, "inference_oom_split", logging.WARNING, rows=len(piece.positions), tokens=piece.tokens
            )
            first, second = piece.split()
            pending += [second, first]
