"""Continuous learning: feedback, retraining and the promotion gate, active learning."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from stream_classifier.config.base import Section, StrList, split_list


class FeedbackSettings(Section):
    """Labelled feedback topics and the bounded in-memory training set built from them."""

    topics: StrList = Field(
        default_factory=list,
        description=(
            "Labelled feedback topics (a JSON list or comma-separated), read from the beginning at every "
            "start."
        ),
    )
    max_examples_per_label: int = Field(
        default=2_000, ge=1, description="Examples kept per label, by reservoir sampling."
    )
    max_labels: int = Field(default=100, ge=2, description="Label slots of the feedback set.")
    max_bytes: int = Field(
        default=65_536,
        ge=1,
        description="Largest feedback value; a larger one is dead-lettered as 'too_large'.",
    )
    max_held_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description=(
            "Memory the trainer may spend on held feedback examples (texts, labels and ids as "
            "Python holds them). Pending labels (see 'min_label_examples') hold at most an eighth "
            "of it; over the whole, the label holding the most bytes gives up a random example, "
            "so the labels share the budget."
        ),
    )
    max_label_chars: int = Field(
        default=100,
        ge=1,
        le=1_000,
        description=(
            "Longest feedback label, in characters; a longer one is dead-lettered as 'label_too_long'."
        ),
    )
    min_label_examples: int = Field(
        default=3,
        ge=1,
        description=(
            "Distinct examples a label that the served model does not know (and that is not in "
            "'allowed_labels') needs before it takes a label slot; until then it is pending and "
            "not trained on."
        ),
    )
    allowed_labels: StrList = Field(
        default_factory=list,
        description=(
            "Labels always given a slot without waiting for 'min_label_examples', like the "
            "served model's own labels (a JSON list or comma-separated)."
        ),
    )

    _split = field_validator("topics", "allowed_labels", mode="before")(split_list)


class RetrainSettings(Section):
    """Periodic retraining, the promotion gate and the model store."""

    enabled: bool = Field(
        default=False,
        description=(
            "Make this process the trainer: it reads feedback, retrains and promotes (one per model store)."
        ),
    )
    interval_s: float = Field(
        default=3_600.0, gt=0, description="A run starts this often when enough new examples arrived."
    )
    min_new_examples: int = Field(
        default=32, ge=1, description="New or relabelled examples a scheduled run needs."
    )
    mode: Literal["full", "head"] = Field(
        default="full",
        description=(
            "'full' fine-tunes the body and fits a new head; 'head' refits the head on cached embeddings."
        ),
    )
    model_store: Path | None = Field(
        default=None,
        description="Directory of model versions and the manifest (a shared volume for several replicas).",
    )
    keep_versions: int = Field(
        default=5, ge=1, description="Versions kept in the store (the current one always)."
    )
    updates_topic: str = Field(
        default="stream-classifier-model-updates",
        description="Compacted topic that announces each promotion to every replica.",
    )
    trusted_eval: str | None = Field(
        default=None,
        description=(
            "A JSONL/CSV file, or 'topic:NAME', the challenger must not score worse on than the champion."
        ),
    )
    holdout_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Share of feedback held out (by hash of the id, or the text) and never trained on.",
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Held-out macro-F1 margin a challenger must beat the champion by (0: a tie does not promote)."
        ),
    )
    min_eval_examples: int = Field(
        default=10, ge=1, description="Held-out examples a run needs; with fewer it is skipped."
    )
    num_iterations: int = Field(
        default=20,
        ge=1,
        description=(
            "Contrastive pair iterations (CPU-sized; the model card's defaults are in TrainingConfig)."
        ),
    )
    epochs: int = Field(default=1, ge=1, description="Training epochs of the body.")
    batch_size: int = Field(default=16, ge=1, description="Training batch size.")
    learning_rate: float = Field(default=2e-5, gt=0, description="Body learning rate.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Cap on body training steps; unset: no cap."
    )
    train_max_seq_length: int = Field(
        default=64,
        ge=8,
        description=(
            "Tokens per text in body training only; evaluation and head embeddings use "
            "'model.max_seq_length'."
        ),
    )
    recipe: Literal["setfit", "fast", "anchors", "centroid", "names", "supcon", "combined"] = Field(
        default="setfit",
        description=(
            "Training recipe (docs/models.md#training-recipe): 'setfit' is plain SetFit; the others are "
            "candidates measured against it by benchmarks/accuracy.py."
        ),
    )
    seed: int = Field(default=42, description="Seed of the pairs, the split and the head fit.")
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="torch threads of the training child process, so that training never starves inference.",
    )
    nice: int = Field(default=10, ge=0, le=19, description="os.nice() of the training child process.")
    max_memory_mb: int | None = Field(
        default=None,
        ge=64,
        description=(
            "Address-space cap of the training child (CPU only: CUDA cannot run under it; on CUDA use "
            "'retrain.gpu_memory_fraction'); a run over it fails cleanly."
        ),
    )
    device: str | None = Field(
        default=None,
        description="Device of the training child: 'auto', 'cpu', 'cuda' or 'cuda:N'; unset: 'model.device'.",
    )
    gpu_memory_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "Share of the GPU's memory the training child may allocate on CUDA "
            "(torch.cuda.set_per_process_memory_fraction), so that it leaves the serving model room."
        ),
    )
    events_topic: str | None = Field(
        default=None, description="Topic that also receives one JSON record per run (runs are always logged)."
    )
    manifest_poll_s: float = Field(
        default=30.0,
        gt=0,
        description="Replicas re-read the manifest this often, in case they missed an announcement.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token for POST /retrain from non-loopback clients; unset or blank: loopback only."
        ),
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None or value in {"auto", "cpu", "cuda"}:
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N (or unset: model.device)")

    @model_validator(mode="after")
    def _no_address_space_cap_on_cuda(self) -> RetrainSettings:
        if self.max_memory_mb is not None and (self.device or "").startswith("cuda"):
            raise ValueError(
                "retrain.max_memory_mb caps the address space (RLIMIT_AS), which CUDA cannot run under: "
                "unset it and cap the child's GPU memory with retrain.gpu_memory_fraction, or train on "
                "retrain.device=cpu"
            )
        return self


class ActiveLearningSettings(Section):
    """Route uncertain predictions to a review topic."""

    topic: str | None = Field(default=None, description="Review topic for uncertain predictions; unset: off.")
    threshold: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="A prediction whose top probability is below this is copied to the review topic.",
    )
    margin: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="A prediction whose top-two margin is below this is copied to the review topic.",
    )
    max_per_second: float = Field(
        default=10.0,
        gt=0,
        description="Copies per second at most (token bucket); the excess is counted, never the prediction.",
    )
