"""The cascade's student: a static-embedding model distilled from a model's own body.

A student lives in the model directory's ``student/`` folder, beside the setfit files it
never touches (setfit and :func:`~stream_classifier.model.format.load_model` ignore it):

- the model2vec static model (``model.safetensors``, ``tokenizer.json``, ``config.json``,
  ...), distilled with ``model2vec.distill`` from the directory's fine-tuned body: one
  forward pass per vocabulary token, PCA to :data:`PCA_DIMS` and SIF weighting, so that a
  text's embedding is the mean of its tokens' rows (no attention, no matrix products);
- ``head.safetensors``: a ``LogisticRegression`` head (the main head's defaults), fitted on
  the student's embeddings of the same kept training examples, columns in the model's
  label order;
- ``student.json``: the format, the ``model_version`` it was built for, the labels, the
  head's temperature (fitted as the main head's is, by
  :func:`~stream_classifier.model.calibration.fit_temperature`, on out-of-fold scores) and
  the confidence ``bound`` (:func:`fit_bound`), with the figures of both fits.

Invariants:

- a student serves only the model version it was built for: :meth:`Student.load` refuses
  any other, so a retrained directory never serves a stale student;
- :meth:`Student.predict_proba` is the head's calibrated probabilities (scores divided by
  the temperature), whose top value is what the bound is compared with;
- nothing in ``student/`` is a pickle: loading it cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression

from stream_classifier.errors import ModelError, TrainingError
from stream_classifier.model.calibration import fit_temperature, label_indices, out_of_fold_scores
from stream_classifier.model.examples import Example
from stream_classifier.model.head import LinearHead
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

STUDENT_DIR = "student"
STUDENT_SPEC = "student.json"
STUDENT_HEAD = "head.safetensors"
STUDENT_FORMAT = "stream-classifier/cascade-student"
STUDENT_FORMAT_VERSION = 1
PCA_DIMS = 256
DEFAULT_TARGET_LOSS = 0.005
"""Accuracy the cascade may lose against the transformer alone, as a fraction (0.5 points)."""
NEVER = 1.5
"""A bound above every probability: the student decides nothing."""
CONFIDENCE_Z = 1.645
"""Standard errors of margin on a bound's fitted loss (one-sided 95 %)."""
_INSTALL = "install it with pip install 'stream-classifier[cascade]'"


class StudentSpec(BaseModel):
    """``student.json``."""

    format: str
    format_version: int
    model_version: str
    labels: list[str]
    temperature: float
    bound: float
    target_loss: float
    fit: dict[str, Any] = {}


@dataclass(frozen=True)
class BoundFit:
    """A confidence bound and what it did on the rows it was fitted on."""

    bound: float
    coverage: float  # share of rows at or above the bound (the student's share)
    loss: float  # accuracy lost against the teacher alone on those rows, as a fraction


def fit_bound(
    confidence: NDArray[Any],
    student_correct: NDArray[np.bool_],
    teacher_correct: NDArray[np.bool_],
    target_loss: float = DEFAULT_TARGET_LOSS,
    z: float = CONFIDENCE_Z,
) -> BoundFit:
    """The lowest bound whose cascade, and every cascade with a higher bound, loses at most
    ``target_loss`` accuracy against the teacher alone on these rows, with ``z`` standard
    errors of margin.

    A row at or above the bound is the student's: it costs 1 where only the teacher is
    right (harm) and gains 1 where only the student is (gain). The loss of a bound is
    ``(harm - gain) / n``; the search needs ``(harm - gain + z * sqrt(harm + gain)) / n``
    within the target, since a net loss made of many harms and gains is a noisy one (on
    rows a bound was fitted on, gains offset harms that new rows need not offset). Bounds
    are tried from the most confident row down, ties together; the first bound over the
    target stops the search (a prefix bound, not a lucky dip). No row -> :data:`NEVER`.
    """
    p = np.asarray(confidence, dtype=np.float64)
    n = len(p)
    if n == 0:
        return BoundFit(NEVER, 0.0, 0.0)
    order = np.argsort(-p, kind="stable")
    student, teacher = student_correct[order], teacher_correct[order]
    harm = np.cumsum(teacher & ~student)
    gain = np.cumsum(student & ~teacher)
    sorted_p = p[order]
    # A bound can only sit where the next row is less confident (ties are accepted together).
    ends = np.flatnonzero(np.append(sorted_p[1:] < sorted_p[:-1], True))
    best = BoundFit(NEVER, 0.0, 0.0)
    for end in ends:
        net = float(harm[end] - gain[end])
        if (net + z * math.sqrt(float(harm[end] + gain[end]))) / n > target_loss:
            break
        best = BoundFit(float(sorted_p[end]), (end + 1) / n, net / n)
    return best


def _fit_head(x: NDArray[Any], y: NDArray[np.int64], labels: list[str], seed: int) -> LinearHead:
    """setfit's default head (as the main head) on integer targets, columns in ``labels`` order."""
    model = LogisticRegression(random_state=seed)
    model.fit(x, y)
    return LinearHead.from_sklearn(model, labels)


class Student:
    """A loaded student; see the module docstring for its invariants. Thread-safe."""

    def __init__(self, static: Any, head: LinearHead, spec: StudentSpec) -> None:
        if head.classes != spec.labels:
            raise ModelError(
                f"the student head's classes {head.classes} differ from its labels {spec.labels}"
            )
        self._static = static
        self.head = dataclasses.replace(head, temperature=spec.temperature)
        self.spec = spec
        self._lock = threading.Lock()  # one tokenizer shared by the I/O and compute threads

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def bound(self) -> float:
        return self.spec.bound

    def embed(self, texts: Sequence[str]) -> NDArray[np.float64]:
        with self._lock:
            return _encode(self._static, texts)

    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Calibrated ``(n, k)`` probabilities, columns in :attr:`labels` order."""
        return self.head.predict_proba(self.embed(texts)).astype(np.float32)

    # ------------------------------------------------------------------ files

    def save(self, model_dir: Path | str) -> Path:
        """Write ``model_dir/student/`` (complete or not at all); nothing else is touched."""
        target = Path(model_dir) / STUDENT_DIR
        staging = Path(tempfile.mkdtemp(prefix=".student.", dir=model_dir))
        try:
            self._static.save_pretrained(staging)
            save_file(
                {
                    "coef": np.ascontiguousarray(self.head.coef),
                    "intercept": np.ascontiguousarray(self.head.intercept),
                },
                str(staging / STUDENT_HEAD),
            )
            (staging / STUDENT_SPEC).write_text(self.spec.model_dump_json(indent=2), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, model_dir: Path | str, *, model_version: str | None = None) -> Student:
        """The student of ``model_dir``; refuses one built for another ``model_version``."""
        folder = Path(model_dir) / STUDENT_DIR
        spec_path = folder / STUDENT_SPEC
        if not spec_path.is_file():
            raise ModelError(f"{folder}: no cascade student; build one with build_student({model_dir!s})")
        try:
            spec = StudentSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
        except (OSError, ValidationError) as exc:
            raise ModelError(f"{spec_path}: unreadable ({exc}); delete {folder} and rebuild it") from None
        if spec.format != STUDENT_FORMAT or spec.format_version != STUDENT_FORMAT_VERSION:
            raise ModelError(f"{spec_path}: unknown student format {spec.format!r} v{spec.format_version}")
        if model_version is not None and spec.model_version != model_version:
            raise ModelError(
                f"{folder} was built for model version {spec.model_version}, not {model_version}: "
                "rebuild it with build_student (a retrained model needs its own student)"
            )
        try:
            tensors = load_file(str(folder / STUDENT_HEAD))
        except Exception as exc:  # safetensors' own error type, OSError, ...
            raise ModelError(f"{folder / STUDENT_HEAD}: unreadable ({type(exc).__name__}: {exc})") from None
        try:
            head = LinearHead(tensors["coef"], tensors["intercept"], spec.labels, "multinomial")
        except KeyError as exc:
            raise ModelError(
                f"{folder / STUDENT_HEAD}: no {exc} tensor; delete {folder} and rebuild it"
            ) from None
        return cls(_load_static(folder), head, spec)


def _encode(static: Any, texts: Sequence[str]) -> NDArray[np.float64]:
    """The static model's ``(n, d)`` embeddings (mean of token rows, normalised)."""
    if not texts:
        return np.zeros((0, int(static.dim)), dtype=np.float64)
    vectors = static.encode(list(texts), use_multiprocessing=False, batch_size=1024)
    return np.asarray(vectors, dtype=np.float64)


def _model2vec() -> Any:
    try:
        import model2vec  # noqa: PLC0415 - optional extra [cascade]
    except ImportError:
        raise ModelError(f"the cascade needs model2vec: {_INSTALL}") from None
    return model2vec


def _load_static(folder: Path) -> Any:
    model2vec = _model2vec()
    try:  # the path exists, so model2vec reads it and never reaches a hub
        return model2vec.StaticModel.from_pretrained(folder, quantize_to="float32")
    except Exception as exc:  # model2vec's and safetensors' errors, OSError, ...
        raise ModelError(f"{folder}: unreadable student ({type(exc).__name__}: {exc})") from None


def distill_static(model_dir: Path | str, pca_dims: int = PCA_DIMS) -> Any:
    """``model2vec.distill`` of the sentence-transformers body in ``model_dir`` (its own copy)."""
    _model2vec()
    try:
        from model2vec.distill import distill  # noqa: PLC0415 - optional extra [cascade]
    except ImportError as exc:
        raise ModelError(f"model2vec's distill needs {exc.name}: {_INSTALL}") from None
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    dims = min(pca_dims, int(config.get("hidden_size", pca_dims)))
    return distill(str(model_dir), pca_dims=dims, device="cpu")


# --------------------------------------------------------------------------- build


def build_student(
    model_dir: Path | str,
    teacher: Any,
    examples: Sequence[Example],
    *,
    holdout: Sequence[Example] = (),
    target_loss: float = DEFAULT_TARGET_LOSS,
    seed: int = 42,
    static: Any = None,
) -> Student:
    """Distil, fit, calibrate and bound a student for the model in ``model_dir``, and save it there.

    ``teacher`` is the model's runtime (``labels``, ``version``, ``predict_proba``);
    ``examples`` its training examples (the model's kept ones). The bound is fitted on
    ``holdout`` when it has rows (the student's and teacher's calls on it), else on the
    examples: the student's out-of-fold calls against the teacher's in-sample ones, which
    overrate the teacher and so make the bound stricter. ``static`` skips the distillation
    (an already distilled model2vec model of this body).
    """
    started = time.perf_counter()
    labels: list[str] = list(teacher.labels)
    index = {label: i for i, label in enumerate(labels)}
    examples = [e for e in examples if e.label in index]
    if len({e.label for e in examples}) < len(labels):
        raise TrainingError(f"the student needs examples of every label {labels}")
    static = static if static is not None else distill_static(model_dir)
    distilled = time.perf_counter() - started
    x = _encode(static, [e.text for e in examples])
    names = [e.label for e in examples]
    y = label_indices(labels, names)

    def fit_on(rows: NDArray[Any], truth: list[str]) -> LinearHead:
        return _fit_head(rows, label_indices(labels, truth), labels, seed)

    head = fit_on(x, names)
    oof = out_of_fold_scores(x, names, fit_on, labels, seed)
    scores = oof if oof is not None else head.scores(x)
    temperature = fit_temperature(head, scores, y)  # as the main head's calibration
    rows = [e for e in holdout if e.label in index]
    bound_on = "holdout" if rows else ("out_of_fold" if oof is not None else "in_sample")
    if rows:  # the final head's and the teacher's calls on rows neither was fitted on
        truth = label_indices(labels, [e.label for e in rows])
        scores = head.scores(_encode(static, [e.text for e in rows]))
    else:  # out-of-fold student calls against the teacher's in-sample ones
        rows, truth = examples, y
    student_p = head.probabilities_from_scores(scores, temperature)
    teacher_p = np.asarray(teacher.predict_proba([e.text for e in rows]))
    student_right = student_p.argmax(axis=1) == truth
    teacher_right = teacher_p.argmax(axis=1) == truth
    fit = fit_bound(student_p.max(axis=1), student_right, teacher_right, target_loss)
    figures: dict[str, Any] = {
        "examples": len(examples),
        "bound_rows": len(truth),
        "bound_on": bound_on,
        "coverage": round(fit.coverage, 4),
        "loss": round(fit.loss, 4),
        "student_accuracy": round(float(student_right.mean()), 4),
        "teacher_accuracy": round(float(teacher_right.mean()), 4),
        "distill_seconds": round(distilled, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    spec = _spec(teacher, temperature=temperature, bound=fit.bound, target_loss=target_loss, fit=figures)
    student = Student(static, head, spec)
    student.save(model_dir)
    log_event(
        log, "student_built", path=str(model_dir), version=spec.model_version, bound=fit.bound, **figures
    )
    return student


def _spec(
    teacher: Any, *, temperature: float, bound: float, target_loss: float, fit: dict[str, Any]
) -> StudentSpec:
    return StudentSpec(
        format=STUDENT_FORMAT,
        format_version=STUDENT_FORMAT_VERSION,
        model_version=str(teacher.version),
        labels=list(teacher.labels),
        temperature=temperature,
        bound=bound,
        target_loss=target_loss,
        fit=fit,
    )
