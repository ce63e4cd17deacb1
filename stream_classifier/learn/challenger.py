"""The challenger job: train a candidate model and score it against the champion.

It runs in its own process (:func:`run_job`, started by the retrainer with the ``spawn``
method), so that training never holds the serving process's GIL or threads. Before any
torch work it lowers its priority (``os.nice``), caps torch's threads and, when
configured, its address space; this is what keeps inference throughput up on a shared CPU.

Everything crosses the process boundary as files in one work directory:

- in: ``job.json`` (:class:`JobSpec`), ``train.jsonl``, ``holdout.jsonl``, ``trusted.jsonl``;
- out: ``model/`` (the saved challenger) and ``result.json`` (:class:`JobResult`), or
  ``error.json`` with the failure's message. The exit code is 0 only with ``result.json``.

Mode ``head`` keeps the champion's body and refits only the head, on embeddings cached
per body in ``cache_dir`` (so repeated runs embed only texts they have not seen). Mode
``full`` fine-tunes the champion's body contrastively and fits a new head.

Either way the new head is calibrated on the held-out split (temperature, and thresholds
for ``target_precision``; :mod:`stream_classifier.model.calibration`) before it is saved,
and every score carries ``ece`` and ``log_loss`` beside macro-F1 and accuracy. The
challenger's held-out ``ece``/``log_loss`` are therefore in-sample for its temperature;
the trusted split's are not. Calibration never changes a prediction, so neither does it
change macro-F1, accuracy or the gate.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import accuracy_score, f1_score

from stream_classifier.learn.child_limits import apply_child_limits
from stream_classifier.model.calibration import calibrate_from, calibration_scores
from stream_classifier.model.examples import Example, cap_per_label, fingerprint
from stream_classifier.model.format import ModelBundle, TrainingData, load_model, save_model, utc_now_iso
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import TrainingConfig, fit_head, train_model
from stream_classifier.ops.logs import configure_logging

logger = logging.getLogger(__name__)

Scores = dict[str, float]


@dataclass(frozen=True)
class JobSpec:
    """What the challenger job needs; written by the retrainer as ``job.json``."""

    mode: Literal["full", "head"]
    champion_dir: str
    version: str
    device: str = "cpu"
    precision: str = "auto"
    # The serving truncation (model.max_seq_length; None = the body's own): head-mode
    # embeddings and the gate's scores are computed as the service will compute them. Body
    # training has its own, shorter truncation in ``training``.
    max_seq_length: int | None = None
    torch_threads: int = 1
    nice: int = 10
    max_memory_mb: int | None = None
    gpu_memory_fraction: float | None = None  # the child's GPU memory share on CUDA
    cache_dir: str | None = None
    max_examples_per_label: int = 2_000
    seed: int = 42
    training: dict[str, Any] = field(default_factory=dict)
    # decision.target_precision: label -> precision its threshold is fitted to reach.
    target_precision: dict[str, float] = field(default_factory=dict)


@dataclass
class JobResult:
    """What the job reports back (``result.json``)."""

    version: str
    labels: list[str]
    train_examples: int
    # role ("champion"/"challenger") -> split ("holdout"/"trusted") -> metric -> value
    scores: dict[str, dict[str, Scores]]
    durations: dict[str, float]
    # The challenger head's calibration (calibrate_from's summary: source, temperature, thresholds, ...)
    calibration: dict[str, Any] = field(default_factory=dict)


def write_examples(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for e in examples:
            handle.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")


def _read_examples(path: Path) -> list[Example]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [Example(**json.loads(line)) for line in handle if line.strip()]


def score(true: list[str], predicted: list[str]) -> Scores:
    """Macro-F1 (over the labels present in either list) and accuracy."""
    return {
        "macro_f1": float(f1_score(true, predicted, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(true, predicted)),
    }


def score_probabilities(classes: list[str], probabilities: NDArray[Any], true: list[str]) -> Scores:
    """:func:`score` of the argmax predictions, plus ``ece`` and ``log_loss`` (the latter
    over the examples whose label ``classes`` holds; absent when none)."""
    predicted = [classes[i] for i in np.asarray(probabilities).argmax(axis=1)]
    return {**score(true, predicted), **calibration_scores(classes, probabilities, true)}


# --------------------------------------------------------------------------- process setup


def _throttle(spec: JobSpec) -> None:
    """Lower priority, cap threads and memory (learn/child_limits.py): before torch starts any pool."""
    apply_child_limits(
        device=spec.device,
        nice=spec.nice,
        torch_threads=spec.torch_threads,
        max_memory_mb=spec.max_memory_mb,
        gpu_memory_fraction=spec.gpu_memory_fraction,
    )


def run_job(work_dir: str) -> None:
    """The child process's entry point (see the module docstring for the file protocol)."""
    configure_logging()
    work = Path(work_dir)
    try:
        spec = JobSpec(**json.loads((work / "job.json").read_text(encoding="utf-8")))
        _throttle(spec)
        result = _train_and_score(spec, work)
        (work / "result.json").write_text(json.dumps(asdict(result)), encoding="utf-8")
    except BaseException as exc:  # the parent reads the reason; nothing else may escape
        message = f"{type(exc).__name__}: {exc}"
        try:
            (work / "error.json").write_text(
                json.dumps({"error": message, "traceback": traceback.format_exc()}), encoding="utf-8"
            )
        finally:
            sys.exit(1)


# --------------------------------------------------------------------------- training


class _EmbeddingCache:
    """Embeddings of one body, by text.

    Bounded: a save keeps only the texts of the latest run, and only the current body's file
    (the caches of other bodies are deleted).
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._rows: dict[str, NDArray[np.float32]] = {}
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as data:
                self._rows = dict(zip(data["texts"].tolist(), data["embeddings"], strict=True))

    def embed(self, runtime: ModelRuntime, texts: list[str]) -> NDArray[np.float32]:
        missing = sorted({t for t in texts if t not in self._rows})
        if missing:
            self._rows.update(zip(missing, runtime.embed(missing), strict=True))
        return np.stack([self._rows[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def save(self, keep: set[str]) -> None:
        if self._path is None:
            return
        texts = sorted(t for t in self._rows if t in keep)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.stem + ".tmp.npz")
        np.savez(tmp, texts=np.array(texts, dtype=str), embeddings=np.stack([self._rows[t] for t in texts]))
        os.replace(tmp, self._path)
        for other in self._path.parent.glob("*.npz"):
            if other != self._path:
                other.unlink(missing_ok=True)


def _runtime(bundle: ModelBundle, spec: JobSpec) -> ModelRuntime:
    return ModelRuntime(
        bundle, device=spec.device, precision=spec.precision, max_seq_length=spec.max_seq_length
    )


def _train_and_score(spec: JobSpec, work: Path) -> JobResult:
    train = _read_examples(work / "train.jsonl")
    holdout = _read_examples(work / "holdout.jsonl")
    trusted = _read_examples(work / "trusted.jsonl")
    durations: dict[str, float] = {}

    started = time.perf_counter()
    champion = load_model(spec.champion_dir, device="cpu")
    body_id = str(champion.metadata.params.get("body_version", champion.version))
    champion_rt = _runtime(champion, spec)
    # Embeddings depend on the body and on how it runs: keyed by device, precision and length too.
    key = f"{body_id}-{champion_rt.device}-{champion_rt.precision}-{champion_rt.max_seq_length}".replace(
        ":", "_"
    )
    cache_path = Path(spec.cache_dir) / f"{key}.npz" if spec.cache_dir else None
    cache = _EmbeddingCache(cache_path)
    if spec.mode == "head":
        n, sha = fingerprint(train)
        embeddings = cache.embed(champion_rt, [e.text for e in train])
        head = fit_head(embeddings, [e.label for e in train], spec.seed)
        challenger = ModelBundle(
            body=champion.body,
            head=head,
            metadata=champion.metadata.model_copy(
                update={
                    "version": spec.version,
                    "created_at": utc_now_iso(),
                    "labels": head.classes,
                    "training_data": TrainingData(n=n, sha256=sha),
                    "parent_version": champion.version,
                    "params": {**champion.metadata.params, "mode": "head", "body_version": body_id},
                    "metrics": {},
                }
            ),
            normalize_embeddings=champion.normalize_embeddings,
            examples=cap_per_label(train, spec.max_examples_per_label),
        )
        challenger_rt = champion_rt
    else:
        config = TrainingConfig(
            **spec.training,
            seed=spec.seed,
            max_examples_per_label=spec.max_examples_per_label,
            show_progress_bar=False,
        )
        challenger = train_model(train, champion, config, device=spec.device)
        challenger.metadata = challenger.metadata.model_copy(
            update={
                "version": spec.version,
                "params": {**challenger.metadata.params, "mode": "full", "body_version": spec.version},
            }
        )
        challenger_rt = _runtime(challenger, spec)
    embedded: dict[str, NDArray[np.float32]] = {}
    calibration: dict[str, Any] = {"source": None, "reason": "no held-out examples"}
    if holdout:
        holdout_texts = [e.text for e in holdout]
        embedded["holdout"] = cache.embed(champion_rt, holdout_texts)
        if challenger_rt is not champion_rt:
            embedded["challenger_holdout"] = challenger_rt.embed(holdout_texts)
        challenger.head, calibration = calibrate_from(
            challenger.head,
            embedded.get("challenger_holdout", embedded["holdout"]),
            [e.label for e in holdout],
            spec.target_precision,
        )
    save_model(challenger, work / "model")
    durations["train"] = time.perf_counter() - started

    started = time.perf_counter()
    scores: dict[str, dict[str, Scores]] = {"champion": {}, "challenger": {}}
    for split, examples in (("holdout", holdout), ("trusted", trusted)):
        if not examples:
            continue
        texts = [e.text for e in examples]
        truth = [e.label for e in examples]
        champion_emb = embedded.get(split)
        if champion_emb is None:
            champion_emb = cache.embed(champion_rt, texts)
        challenger_emb = embedded.get(f"challenger_{split}")
        if challenger_emb is None:
            challenger_emb = champion_emb if challenger_rt is champion_rt else challenger_rt.embed(texts)
        for role, bundle, emb in (
            ("champion", champion, champion_emb),
            ("challenger", challenger, challenger_emb),
        ):
            scores[role][split] = score_probabilities(bundle.labels, bundle.head.predict_proba(emb), truth)
    durations["evaluate"] = time.perf_counter() - started
    cache.save({e.text for e in train + holdout + trusted})
    return JobResult(
        version=spec.version,
        labels=challenger.labels,
        train_examples=len(train),
        scores=scores,
        durations=durations,
        calibration=calibration,
    )
