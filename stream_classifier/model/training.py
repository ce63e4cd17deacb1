"""SetFit training on sentence-transformers + scikit-learn (no ``setfit`` at run time).

Two stages, as in setfit:

1. **Contrastive body fine-tuning.** :class:`ContrastivePairs` yields text pairs labelled
   1.0 (same label) or 0.0 (different labels) with setfit's ``ContrastiveDataset``
   semantics: candidate pairs are all ``(i, j)`` with ``i <= j`` (self-pairs included);
   positives and negatives alternate (setfit's ``zip_longest``: once the shorter side is
   done, the longer goes on alone); each side yields ``L`` pairs, cycling through its
   candidates in a seeded random order, where ``L`` is ``num_iterations * n`` when
   ``num_iterations`` is set, else the larger (``oversampling``) or smaller
   (``undersampling``) side's count, or for ``unique`` each side's own count (every
   candidate once). Unlike setfit, no pair list is ever built:
   a pair is computed from its rank in O(1) memory, so large sets cannot run out of memory.
   The body is trained with CosineSimilarityLoss (MSE between cosine similarity and the
   pair label; or sentence-transformers' ContrastiveLoss), AdamW and a linear warm-up/decay
   schedule, under fp16 autocast with a gradient scaler on CUDA.
2. **Head.** A scikit-learn ``LogisticRegression`` (setfit's default head) fitted on the
   embeddings of the training texts (:func:`fit_head`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from sentence_transformers import SentenceTransformer
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from stream_classifier.errors import ModelError, TrainingError
from stream_classifier.model.examples import Example, cap_per_label, fingerprint
from stream_classifier.model.format import (
    METADATA_FILE,
    ModelBundle,
    ModelMetadata,
    TrainingData,
    load_body,
    new_version_id,
    utc_now_iso,
)
from stream_classifier.model.head import LinearHead
from stream_classifier.model.runtime import resolve_device
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

SamplingStrategy = Literal["oversampling", "undersampling", "unique"]


class TrainingConfig(BaseModel):
    """Training hyperparameters. Defaults are the seed model card's (hours on 2 CPU cores;
    see docs/models.md for CPU-sized settings)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=16, ge=1)
    epochs: int = Field(default=3, ge=1)
    sampling_strategy: SamplingStrategy = "oversampling"
    # Pairs per side = num_iterations * len(examples); overrides the sampling strategy's count.
    num_iterations: int | None = Field(default=40, ge=1)
    body_learning_rate: float = Field(default=2e-5, gt=0)
    warmup_proportion: float = Field(default=0.153, ge=0, lt=1)
    # setfit's l2_weight; as in the transformers Trainer that setfit drives, biases and
    # LayerNorm weights are not decayed, and the gradient norm is clipped at max_grad_norm.
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    # Truncation for body training only (inference uses the model's own maximum).
    max_seq_length: int | None = Field(default=None, ge=8)
    # cosine: CosineSimilarityLoss (setfit's default); contrastive: sentence-transformers'
    # ContrastiveLoss on cosine distance with ``margin``.
    loss: Literal["cosine", "contrastive"] = "cosine"
    margin: float = Field(default=0.5, gt=0)
    seed: int = 42
    use_amp: bool = True  # applies on CUDA only
    show_progress_bar: bool = True
    # Training examples kept in the model directory, per label (retraining builds on them).
    max_examples_per_label: int = Field(default=2_000, ge=1)
    # Skip body fine-tuning: embed with the base body and fit the head only.
    head_only: bool = False


# --------------------------------------------------------------------------- pairs


def _unrank_triangle(k: int, n: int) -> tuple[int, int]:
    """The k-th pair ``(a, b)``, ``a <= b < n``, in row-major order of the upper triangle."""
    # Row a starts at a*n - a*(a-1)/2; invert the quadratic, then fix rounding.
    a = int(((2 * n + 1) - math.sqrt((2 * n + 1) ** 2 - 8 * k)) // 2)
    while a > 0 and a * n - a * (a - 1) // 2 > k:
        a -= 1
    while (a + 1) * n - (a + 1) * a // 2 <= k:
        a += 1
    return a, a + (k - (a * n - a * (a - 1) // 2))


class _PairSpace:
    """A ranked space of candidate pairs with O(1)-memory random-order cycling."""

    def __init__(self, blocks: list[tuple[Any, int]]) -> None:
        self._blocks = [(key, size) for key, size in blocks if size > 0]
        self._starts = np.cumsum([0] + [size for _, size in self._blocks])
        self.size = int(self._starts[-1])

    def locate(self, rank: int) -> tuple[Any, int]:
        block = int(np.searchsorted(self._starts, rank, side="right")) - 1
        return self._blocks[block][0], rank - int(self._starts[block])

    def cycle(self, rng: np.random.Generator) -> Iterator[int]:
        """Ranks forever: each pass visits every rank once, in a fresh affine permutation."""
        while True:
            step = int(rng.integers(1, max(2, self.size)))
            while math.gcd(step, self.size) != 1:
                step += 1
            offset = int(rng.integers(0, self.size))
            for i in range(self.size):
                yield (offset + i * step) % self.size


class ContrastivePairs:
    """Lazily generated contrastive pairs; see the module docstring for the semantics."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        sampling_strategy: SamplingStrategy = "oversampling",
        num_iterations: int | None = None,
        seed: int = 42,
    ) -> None:
        self._texts = [e.text for e in examples]
        members: dict[str, list[int]] = {}
        for index, example in enumerate(examples):
            members.setdefault(example.label, []).append(index)
        if len(members) < 2:
            raise TrainingError("training needs examples of at least two labels")
        self._members = list(members.values())
        sizes = [len(m) for m in self._members]
        self._positives = _PairSpace([(i, s * (s + 1) // 2) for i, s in enumerate(sizes)])
        self._negatives = _PairSpace(
            [((i, j), sizes[i] * sizes[j]) for i in range(len(sizes)) for j in range(i + 1, len(sizes))]
        )
        self._seed = seed
        if num_iterations:
            self.positives = self.negatives = num_iterations * len(examples)
        elif sampling_strategy == "unique":
            self.positives, self.negatives = self._positives.size, self._negatives.size
        elif sampling_strategy == "undersampling":
            self.positives = self.negatives = min(self._positives.size, self._negatives.size)
        else:
            self.positives = self.negatives = max(self._positives.size, self._negatives.size)

    def __len__(self) -> int:
        return self.positives + self.negatives

    def _positive(self, rank: int) -> tuple[int, int]:
        label, k = self._positives.locate(rank)
        group = self._members[label]
        a, b = _unrank_triangle(k, len(group))
        return group[a], group[b]

    def _negative(self, rank: int) -> tuple[int, int]:
        (i, j), k = self._negatives.locate(rank)
        right = self._members[j]
        return self._members[i][k // len(right)], right[k % len(right)]

    def __iter__(self) -> Iterator[tuple[str, str, float]]:
        rng = np.random.default_rng(self._seed)
        positives = self._positives.cycle(rng)
        negatives = self._negatives.cycle(rng)
        for index in range(max(self.positives, self.negatives)):  # setfit's zip_longest
            if index < self.positives:
                a, b = self._positive(next(positives))
                yield self._texts[a], self._texts[b], 1.0
            if index < self.negatives:
                a, b = self._negative(next(negatives))
                yield self._texts[a], self._texts[b], 0.0


# --------------------------------------------------------------------------- body


def _batches(pairs: ContrastivePairs, batch_size: int) -> Iterator[list[tuple[str, str, float]]]:
    batch: list[tuple[str, str, float]] = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize(body: SentenceTransformer, texts: list[str], max_length: int, device: torch.device) -> Any:
    features = body.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {key: value.to(device) for key, value in features.items()}


def pair_loss(similarity: torch.Tensor, target: torch.Tensor, config: TrainingConfig) -> torch.Tensor:
    """The pair loss: MSE to the pair label, or contrastive loss on ``1 - similarity``."""
    if config.loss == "cosine":
        return torch.nn.functional.mse_loss(similarity, target)
    distance = 1.0 - similarity
    hinge = torch.relu(config.margin - distance)
    return (0.5 * (target * distance.pow(2) + (1.0 - target) * hinge.pow(2))).mean()


def _linear_warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then linear decay to 0 (transformers' ``linear`` schedule, as setfit)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _decay_groups(body: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weights, none on biases and LayerNorm weights."""
    no_decay = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in body.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, parameter in body.named_parameters():
        if parameter.requires_grad:
            (plain if name in no_decay or name.endswith("bias") else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def fine_tune_body(
    body: SentenceTransformer, examples: Sequence[Example], config: TrainingConfig, device: torch.device
) -> dict[str, Any]:
    """Contrastive fine-tuning of ``body`` in place; returns step count, loss and duration."""
    pairs = ContrastivePairs(
        examples,
        sampling_strategy=config.sampling_strategy,
        num_iterations=config.num_iterations,
        seed=config.seed,
    )
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    body_max = int(body.max_seq_length or 512)
    max_length = min(config.max_seq_length or body_max, body_max)
    body.to(device).train()
    # The fused kernel (what the transformers Trainer under setfit picks) is ~6x faster per
    # step than the default on the CPU, where the optimiser step is a large part of a step.
    optimizer = torch.optim.AdamW(
        _decay_groups(body, config.weight_decay),
        lr=config.body_learning_rate,
        fused=device.type in {"cpu", "cuda"},
    )
    warmup_steps = math.ceil(total_steps * config.warmup_proportion)
    scheduler = _linear_warmup_schedule(optimizer, warmup_steps, total_steps)
    amp = config.use_amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    started = time.perf_counter()
    step = 0
    last_loss = float("nan")
    progress = tqdm(total=total_steps, desc="training", unit="step", disable=not config.show_progress_bar)
    try:
        while step < total_steps:
            for batch in _batches(pairs, config.batch_size):
                left = _tokenize(body, [p[0] for p in batch], max_length, device)
                right = _tokenize(body, [p[1] for p in batch], max_length, device)
                target = torch.tensor([p[2] for p in batch], device=device)
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    a = body(left)["sentence_embedding"]
                    b = body(right)["sentence_embedding"]
                    similarity = torch.cosine_similarity(a.float(), b.float())
                    loss = pair_loss(similarity, target, config)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                if config.max_grad_norm is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(body.parameters(), config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                last_loss = float(loss.item())
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}")
                if step % 50 == 0 or step == total_steps:
                    log_event(log, "training_step", step=step, total=total_steps, loss=round(last_loss, 5))
                if step >= total_steps:
                    break
    finally:
        progress.close()
        body.eval()
    return {
        "steps": step,
        "pairs": len(pairs),
        "final_loss": last_loss,
        "seconds": round(time.perf_counter() - started, 3),
    }


# --------------------------------------------------------------------------- head


def fit_head(embeddings: NDArray[Any], labels: Sequence[str], seed: int = 42) -> LinearHead:
    """Fit setfit's default head (``LogisticRegression``) on embeddings; classes sorted by name."""
    if len(set(labels)) < 2:
        raise TrainingError("the head needs examples of at least two labels")
    model = LogisticRegression(random_state=seed)
    model.fit(np.asarray(embeddings, dtype=np.float64), np.asarray(list(labels), dtype=object).astype(str))
    return LinearHead.from_sklearn(model)


def encode(
    body: SentenceTransformer, texts: Sequence[str], *, normalize: bool, batch_size: int
) -> NDArray[Any]:
    """Embeddings as setfit computes them for its head (``SentenceTransformer.encode``)."""
    result: NDArray[Any] = body.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=normalize,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return result


# --------------------------------------------------------------------------- the whole


@dataclass(frozen=True)
class _Base:
    body: SentenceTransformer
    name: str
    parent_version: str | None
    normalize_embeddings: bool


def _base(base: str | Path | SentenceTransformer | ModelBundle) -> _Base:
    """The body to start from, never shared with the caller (training changes it in place)."""
    if isinstance(base, ModelBundle):
        return _Base(
            copy.deepcopy(base.body), base.metadata.base_model, base.version, base.normalize_embeddings
        )
    if isinstance(base, SentenceTransformer):
        return _Base(copy.deepcopy(base), "in-memory", None, False)
    body = load_body(base)
    metadata_path = Path(str(base)) / METADATA_FILE
    if metadata_path.is_file():
        try:
            parent = ModelMetadata.model_validate_json(metadata_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"{metadata_path}: invalid metadata ({exc})") from None
        return _Base(body, parent.base_model, parent.version, False)
    return _Base(body, str(base), None, False)


def train_model(
    examples: Sequence[Example],
    base: str | Path | SentenceTransformer | ModelBundle,
    config: TrainingConfig | None = None,
    *,
    device: str = "auto",
) -> ModelBundle:
    """Train a SetFit model from ``base`` (a sentence-transformers path, hub id, model
    directory, body or bundle). The labels are whatever ``examples`` hold: a label set
    that grew since ``base`` was trained is normal."""
    config = config or TrainingConfig()
    examples = list(examples)
    if len({e.label for e in examples}) < 2:
        raise TrainingError("training needs examples of at least two labels")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    resolved = resolve_device(device)
    start = _base(base)
    body = start.body
    started = time.perf_counter()
    body_stats: dict[str, Any] = {"steps": 0}
    if not config.head_only:
        body_stats = fine_tune_body(body, examples, config, resolved)
    body.to(resolved)
    embeddings = encode(
        body,
        [e.text for e in examples],
        normalize=start.normalize_embeddings,
        batch_size=config.batch_size * 2,
    )
    head = fit_head(embeddings, [e.label for e in examples], config.seed)
    body.to("cpu")
    n, sha = fingerprint(examples)
    seconds = round(time.perf_counter() - started, 3)
    log_event(log, "training_done", labels=head.classes, examples=n, seconds=seconds, body=body_stats)
    metadata = ModelMetadata(
        version=new_version_id(),
        created_at=utc_now_iso(),
        base_model=start.name,
        labels=head.classes,
        training_data=TrainingData(n=n, sha256=sha),
        parent_version=start.parent_version,
        params={
            **config.model_dump(),
            "device": str(resolved),
            "training_seconds": seconds,
            "body": body_stats,
        },
    )
    return ModelBundle(
        body=body,
        head=head,
        metadata=metadata,
        normalize_embeddings=start.normalize_embeddings,
        examples=cap_per_label(examples, config.max_examples_per_label),
    )
