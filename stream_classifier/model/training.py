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
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sentence_transformers import SentenceTransformer
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from stream_classifier.errors import ModelError, TrainingError
from stream_classifier.model.anchors import AnchorDecision, anchor_examples, zero_shot_gate
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
from stream_classifier.model.geometry import add_label_prior, blend_centroid
from stream_classifier.model.head import LinearHead
from stream_classifier.model.pairs import ContrastivePairs, SamplingStrategy
from stream_classifier.model.recipes import HEAD_SETTINGS, recipe_parts
from stream_classifier.model.runtime import resolve_device
from stream_classifier.model.supcon import PKSampler, supcon_loss
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)


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
    # ContrastiveLoss on cosine distance with ``margin``; supcon: SupCon on P×K batches
    # (model/supcon.py) at ``supcon_temperature``, as many steps as the pairs would take.
    loss: Literal["cosine", "contrastive", "supcon"] = "cosine"
    margin: float = Field(default=0.5, gt=0)
    supcon_temperature: float = Field(default=0.07, gt=0)
    # Recipe parts (model/recipes.py names the presets; these defaults are plain setfit).
    recipe: str = "setfit"  # the preset these settings came from, recorded in the metadata
    drop_self_pairs: bool = False  # no (x, x) pairs (model/pairs.py)
    fit_max_length: bool = False  # train at the texts' own 99th-percentile length if shorter
    # Cleaned label names as extra contrastive examples: never, when the zero-shot gate
    # passes (model/anchors.py), or always.
    label_anchors: Literal["off", "gated", "on"] = "off"
    # logits + weight * cos(x, name_k) folded into the head, under the same gate (model/anchors.py).
    label_prior: Literal["off", "gated", "on"] = "off"
    label_prior_weight: float = Field(default=2.0, gt=0)
    # Nearest-centroid blend folded into the logistic head (model/geometry.py); 0 = none.
    centroid_weight: float = Field(default=0.0, ge=0, le=1)
    centroid_temperature: float = Field(default=0.1, gt=0)
    seed: int = 42
    use_amp: bool = True  # applies on CUDA only
    show_progress_bar: bool = True
    # Training examples kept in the model directory, per label (retraining builds on them).
    max_examples_per_label: int = Field(default=2_000, ge=1)
    # Skip body fine-tuning: embed with the base body and fit the head only.
    head_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        """``recipe``'s parts for every field not given explicitly."""
        if isinstance(data, dict) and "recipe" in data:
            return {**recipe_parts(str(data["recipe"])), **data}
        return data

    def body_key(self) -> str:
        """The settings that determine the fine-tuned body (not the head's), as a stable string."""
        return self.model_dump_json(exclude=set(HEAD_SETTINGS))


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


def _pair_batch_loss(
    body: SentenceTransformer,
    batch: list[tuple[str, str, float]],
    config: TrainingConfig,
    max_length: int,
    device: torch.device,
) -> torch.Tensor:
    left = _tokenize(body, [p[0] for p in batch], max_length, device)
    right = _tokenize(body, [p[1] for p in batch], max_length, device)
    target = torch.tensor([p[2] for p in batch], device=device)
    a = body(left)["sentence_embedding"]
    b = body(right)["sentence_embedding"]
    return pair_loss(torch.cosine_similarity(a.float(), b.float()), target, config)


def _supcon_batch_loss(
    body: SentenceTransformer,
    batch: tuple[list[str], list[int]],
    config: TrainingConfig,
    max_length: int,
    device: torch.device,
) -> torch.Tensor:
    texts, labels = batch
    z = body(_tokenize(body, texts, max_length, device))["sentence_embedding"]
    return supcon_loss(z, torch.tensor(labels, device=device), config.supcon_temperature)


def _step_losses(
    body: SentenceTransformer,
    examples: Sequence[Example],
    pairs: ContrastivePairs,
    config: TrainingConfig,
    *,
    max_length: int,
    device: torch.device,
) -> Iterator[Callable[[], torch.Tensor]]:
    """Endless per-step losses: pair batches (the pairs again from the start each epoch, as
    setfit), or SupCon on P×K batches of ``2 * batch_size`` texts (a pair step's text budget)."""
    if config.loss == "supcon":
        index = {label: i for i, label in enumerate(sorted({e.label for e in examples}))}
        for batch in PKSampler(examples, 2 * config.batch_size, config.seed):
            texts = [examples[i].text for i in batch]
            labels = [index[examples[i].label] for i in batch]
            yield functools.partial(_supcon_batch_loss, body, (texts, labels), config, max_length, device)
    while True:
        for pair_batch in _batches(pairs, config.batch_size):
            yield functools.partial(_pair_batch_loss, body, pair_batch, config, max_length, device)


def fitted_max_length(body: SentenceTransformer, texts: Sequence[str], max_length: int) -> int:
    """The training texts' 99th-percentile token count rounded up to 8 (at least 16), at most
    ``max_length``: short texts train at a shorter maximum, long ones are unchanged."""
    ids = body.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = sorted(len(i) for i in ids)
    p99 = lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]
    return min(max_length, max(16, -(-p99 // 8) * 8))


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
        drop_self_pairs=config.drop_self_pairs,
    )
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    body_max = int(body.max_seq_length or 512)
    max_length = min(config.max_seq_length or body_max, body_max)
    if config.fit_max_length:
        max_length = fitted_max_length(body, [e.text for e in examples], max_length)
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
    losses = _step_losses(body, examples, pairs, config, max_length=max_length, device=device)
    try:
        while step < total_steps:
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                loss = next(losses)()
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
    finally:
        progress.close()
        body.eval()
    return {
        "steps": step,
        "pairs": len(pairs),
        "final_loss": last_loss,
        "max_length": max_length,
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


def _body_examples(
    examples: list[Example], config: TrainingConfig, gate: AnchorDecision | None, notes: dict[str, Any]
) -> list[Example]:
    """The contrastive stage's examples: the training examples, plus the label anchors when
    ``label_anchors`` is on, or gated and the base body passed ``gate`` (noted in ``notes``)."""
    if config.label_anchors == "off":
        return examples
    use = True
    if config.label_anchors == "gated":
        assert gate is not None
        notes["anchors_gate"] = {"zero_shot_accuracy": gate.zero_shot_accuracy, "bar": gate.bar}
        use = gate.use
    notes["anchors"] = use
    return examples + anchor_examples([e.label for e in examples]) if use else examples


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
    notes: dict[str, Any] = {}
    gated = "gated" in (config.label_anchors, config.label_prior)
    gate = zero_shot_gate(body, examples) if gated else None  # on the base body, once
    if not config.head_only:
        body_stats = fine_tune_body(body, _body_examples(examples, config, gate, notes), config, resolved)
    body.to(resolved)
    embeddings = encode(
        body,
        [e.text for e in examples],
        normalize=start.normalize_embeddings,
        batch_size=config.batch_size * 2,
    )
    labels = [e.label for e in examples]
    head = blend_centroid(
        fit_head(embeddings, labels, config.seed),
        embeddings,
        labels,
        config.centroid_weight,
        config.centroid_temperature,
    )
    if config.label_prior != "off":
        prior_gate = gate if config.label_prior == "gated" else None
        head = add_label_prior(head, body, config.label_prior_weight, prior_gate, notes)
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
            "recipe_notes": notes,
        },
    )
    return ModelBundle(
        body=body,
        head=head,
        metadata=metadata,
        normalize_embeddings=start.normalize_embeddings,
        examples=cap_per_label(examples, config.max_examples_per_label),
    )
