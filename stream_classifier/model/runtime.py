"""ModelRuntime: text in, class probabilities out, on the chosen device and precision.

Two steps, so that the caller can overlap them:

- :meth:`ModelRuntime.prepare` (CPU only, no model state, safe in another thread)
  tokenises with the body's fast tokenizer, truncating to the maximum sequence length,
  sorts the texts by token length and groups them into chunks whose padded size
  (rows x longest row) stays within the token budget; on the CPU, where padding costs as
  much as real tokens, a chunk also ends where a longer row would pad the rows before it by
  more than a forward pass costs (:data:`CPU_PASS_COST_TOKENS`);
- :meth:`ModelRuntime.infer` runs body + head on each chunk under
  ``torch.inference_mode`` (and autocast unless fp32) and returns ``(n, k)`` float32
  probabilities **in input order**.

Invariants:

- body and head live on one device; the head computes in float32 whatever the body's
  precision (float64 in int8 mode's numpy head);
- CUDA out-of-memory on a chunk is the batch's size, not the messages' fault: the chunk is
  halved and retried (recursively) after emptying the cache; only a single text that does
  not fit re-raises ``torch.cuda.OutOfMemoryError`` (a capacity problem, never a bad message);
- precision ``auto`` is fp16 autocast on CUDA and fp32 on the CPU; ``bf16`` needs bf16
  support on the chosen CUDA device (always available on the CPU);
- ``quantize="int8"`` (CPU only, fp32 around int8 weights) replaces the body by its ONNX
  Runtime int8 export (:mod:`stream_classifier.model.int8`); tokenising and chunking are
  unchanged, and the head computes in numpy (:meth:`LinearHead.predict_proba`): no torch
  operator runs per chunk, so torch's idle intra-op workers never spin on the cores ONNX
  Runtime's own threads use (a torch head cost int8 mode ~16 % on 2 cores, docs/performance.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from stream_classifier.errors import ModelError
from stream_classifier.model.format import ModelBundle, load_model
from stream_classifier.model.int8 import Int8Body
from stream_classifier.model.precision import PrecisionChoice, choose_cpu_precision
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
_AUTOCAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TOKEN_BUDGET = 16_384
# The fixed cost of one forward pass on the CPU, in tokens' worth of compute: the padding a
# chunk may add before a new pass is cheaper. Swept on the bench's texts (docs/performance.md,
# "Padding"): 32 was fastest at batches 64 and 128 for torch fp32 and int8 alike (16-64
# within noise, 128 ~10-15 % slower). On CUDA a pass (its kernel launches) is the larger
# cost, so only the token budget splits there.
CPU_PASS_COST_TOKENS = 32
# A fast tokenizer mutates its truncation state on each call, so concurrent calls on one tokenizer
# (runtimes may share a body) fail with 'Already borrowed': tokenisation is serialised.
_TOKENIZER_LOCK = threading.Lock()
_T = TypeVar("_T")
# What the runtime computes per chunk: padded features in, float32 rows (embeddings or
# probabilities) out, on the host.
ChunkCompute = Callable[[dict[str, torch.Tensor]], NDArray[np.float32]]


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
    """``auto`` -> fp16 on CUDA, fp32 on the CPU; checks bf16 support on CUDA."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ModelError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "bf16" and device.type == "cuda":
        with torch.cuda.device(device):
            if not torch.cuda.is_bf16_supported():
                raise ModelError(f"{device} does not support bf16: use fp16 or fp32")
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class Chunk:
    """One forward pass: the original positions of its texts and their padded features."""

    positions: NDArray[np.int64]
    features: dict[str, torch.Tensor]

    @property
    def tokens(self) -> int:
        ids = self.features["input_ids"]
        return int(ids.shape[0] * ids.shape[1])

    def split(self) -> tuple[Chunk, Chunk]:
        """Two halves, each trimmed of the padding its own longest row does not need."""
        half = len(self.positions) // 2
        return self._slice(0, half), self._slice(half, len(self.positions))

    def _slice(self, start: int, stop: int) -> Chunk:
        mask = self.features["attention_mask"][start:stop]
        width = int(mask.sum(dim=1).max().item()) if stop > start else 0
        features = {key: value[start:stop, :width] for key, value in self.features.items()}
        return Chunk(self.positions[start:stop], features)


@dataclass(frozen=True)
class PreparedBatch:
    """Texts tokenised and grouped for the forward passes (see :meth:`ModelRuntime.prepare`)."""

    size: int
    chunks: list[Chunk]

    @property
    def tokens(self) -> int:
        return sum(chunk.tokens for chunk in self.chunks)


def plan_chunks(
    lengths: Sequence[int], token_budget: int, pass_cost_tokens: int | None = None
) -> list[NDArray[np.int64]]:
    """Group positions, sorted by length, so that rows x longest row <= ``token_budget``.

    With ``pass_cost_tokens``, a chunk also ends before a row whose extra length, padded onto
    every row already in the chunk, would cost more tokens than that (a greedy bound on
    padding). A single text longer than the budget still gets a chunk of its own.
    """
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    chunks: list[NDArray[np.int64]] = []
    start = 0
    for end in range(2, len(order) + 1):
        # Ascending lengths: the row at end-1 is the chunk's longest, end-2 its previous longest.
        rows, longest = end - start, lengths[order[end - 1]]
        if rows > 1 and (
            rows * longest > token_budget
            or (
                pass_cost_tokens is not None
                and (rows - 1) * (longest - lengths[order[end - 2]]) > pass_cost_tokens
            )
        ):
            chunks.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        chunks.append(order[start:])
    return chunks


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
        self.token_budget = token_budget
        self.quantize = quantize
        self.requested_precision = precision
        # The CPU's precision is settled at warm-up (model/precision.py); until then auto is fp32.
        self.precision_choice: PrecisionChoice | None = None
        body_max = bundle.body.max_seq_length or 512
        self.max_seq_length = min(max_seq_length, body_max) if max_seq_length else body_max
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
        if quantize == "none":
            return self._place_torch(bundle)
        if quantize != "int8":
            raise ModelError(f"unknown quantize mode {quantize!r}: use none or int8")
        if self.device.type != "cpu":
            raise ModelError("int8 quantisation is CPU only: use device=cpu, or fp16/bf16 on CUDA")
        if self.precision != "fp32":
            raise ModelError("int8 quantisation computes in fp32 around int8 weights: use precision fp32")
        sample = self.prepare(["an int8 export sample", "a second, longer sample for the export"])
        threads = torch.get_num_threads()
        body = Int8Body.load(bundle.body.eval(), bundle.directory, sample.chunks[0].features, threads=threads)
        normalize, head = bundle.normalize_embeddings, bundle.head

        def embed(features: dict[str, torch.Tensor]) -> NDArray[np.float32]:
            embeddings = body(features)
            if normalize:  # as torch.nn.functional.normalize: x / max(||x||, 1e-12)
                norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
                embeddings = embeddings / np.maximum(norms, 1e-12)
            return embeddings

        def classify(features: dict[str, torch.Tensor]) -> NDArray[np.float32]:
            return head.predict_proba(embed(features)).astype(np.float32)

        return embed, classify

    def _place_torch(self, bundle: ModelBundle) -> tuple[ChunkCompute, ChunkCompute]:
        body = bundle.body.eval().to(self.device)
        head = bundle.head.to_torch(self.device).eval()

        def embed_on_device(features: dict[str, torch.Tensor]) -> torch.Tensor:
            on_device = {key: value.to(self.device, non_blocking=True) for key, value in features.items()}
            with self._autocast():
                embeddings: torch.Tensor = body(on_device)["sentence_embedding"]
            embeddings = embeddings.float()
            if bundle.normalize_embeddings:
                embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
            return embeddings

        def embed(features: dict[str, torch.Tensor]) -> NDArray[np.float32]:
            return _host(embed_on_device(features))

        def classify(features: dict[str, torch.Tensor]) -> NDArray[np.float32]:
            return _host(head(embed_on_device(features)))

        return embed, classify

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
        chunks = [
            Chunk(positions, self._pad(columns, positions, lengths))
            for positions in plan_chunks(lengths, self.token_budget, self._pass_cost_tokens)
        ]
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

    def warmup(self) -> None:
        """One small forward pass of short and long texts (allocators, kernels, autotuning);
        on the CPU with a torch body, first the precision is settled (and logged) once."""
        if self.precision_choice is None and self.device.type == "cpu" and self.quantize == "none":
            self.precision_choice = choose_cpu_precision(self, self.requested_precision)
            self.precision = self.precision_choice.precision  # type: ignore[assignment]
        self.predict_proba(["warm up", "warm up " * max(1, self.max_seq_length // 4)])

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def _run(
        self,
        prepared: PreparedBatch,
        compute: ChunkCompute,
        width: int,
    ) -> NDArray[np.float32]:
        output = np.empty((prepared.size, width), dtype=np.float32)
        with torch.inference_mode():
            for chunk in prepared.chunks:
                for piece, values in self._compute_splitting(chunk, compute):
                    output[piece.positions] = values
        return output

    def _compute_splitting(
        self, chunk: Chunk, compute: ChunkCompute
    ) -> Iterator[tuple[Chunk, NDArray[np.float32]]]:
        try:
            values = compute(chunk.features)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5
            if len(chunk.positions) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            rows = len(chunk.positions)
            log_event(log, "inference_oom_split", level=logging.WARNING, rows=rows, tokens=chunk.tokens)
            for half in chunk.split():
                yield from self._compute_splitting(half, compute)
            return
        yield chunk, values


def _host(values: torch.Tensor) -> NDArray[np.float32]:
    result: NDArray[np.float32] = values.float().cpu().numpy()
    return result
