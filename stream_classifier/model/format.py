"""Model directories: setfit-compatible load and save, a safe head format, metadata.

A model directory holds, as ``setfit`` 1.x saves it:

- the sentence-transformers body files (``modules.json``, ``config.json``, weights, ...);
- ``config_setfit.json``: ``{"labels": [...], "normalize_embeddings": bool}``;
- ``model_head.pkl``: a joblib pickle of a fitted ``LogisticRegression`` (classes
  ``0..k-1``, names in ``labels``), possibly wrapped in ``OneVsRestClassifier``;

and, written by stream-classifier in addition:

- ``head.safetensors`` + ``head.json``: the same head as plain tensors and JSON, loaded by
  preference because reading it cannot run code;
- ``model_metadata.json``: :class:`ModelMetadata` (version id, base model, labels,
  training-data size and sha256, metrics, creation time, parent version, parameters);
- ``training_examples.jsonl``: the kept training examples (capped per label);
- ``int8/``: int8 mode's quantised body, when saved with ``int8=True`` (or added by the
  model store): see :mod:`stream_classifier.model.int8`.

Invariants:

- ``model_head.pkl`` is never unpickled without restriction unless the caller passes
  ``trusted=True``; the restricted reader (:mod:`stream_classifier.model.safe_pickle`)
  builds plain data and plain-dtype arrays only.
- ``head.json`` records the sha256 of the ``model_head.pkl`` saved with it; if the pickle
  was replaced since, the pickle is the truth and is read (restricted) instead.
- Whatever a directory holds, loading it returns a valid head (see
  :mod:`stream_classifier.model.head`) or raises :class:`ModelError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from pydantic import BaseModel, Field
from safetensors.numpy import load_file, save_file
from sentence_transformers import SentenceTransformer

from stream_classifier.errors import ModelError, UnsafeModelError
from stream_classifier.model.examples import Example, read_examples
from stream_classifier.model.head import LinearHead, calibration_from_json, head_from_state
from stream_classifier.model.int8 import ensure_artifact, sha256_file
from stream_classifier.model.safe_pickle import CONVERT_SETFIT_HEAD_HELP, Captured, load_restricted
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

SETFIT_CONFIG = "config_setfit.json"
SETFIT_HEAD = "model_head.pkl"
SAFE_HEAD_TENSORS = "head.safetensors"
SAFE_HEAD_JSON = "head.json"
METADATA_FILE = "model_metadata.json"
EXAMPLES_FILE = "training_examples.jsonl"
SAFE_HEAD_FORMAT = "stream-classifier/linear-head"
SAFE_HEAD_FORMAT_VERSION = 1

MAX_VERSION_CHARS = 200
"""Longest model version id (it names a store directory and travels in every output record)."""


class TrainingData(BaseModel):
    """Size and fingerprint of the data a model was trained on."""

    n: int = 0
    sha256: str = ""


class ModelMetadata(BaseModel):
    """What a model directory says about itself (``model_metadata.json``)."""

    version: str = Field(min_length=1, max_length=MAX_VERSION_CHARS)
    created_at: str
    base_model: str = "unknown"
    labels: list[str]
    training_data: TrainingData = Field(default_factory=TrainingData)
    metrics: dict[str, Any] = Field(default_factory=dict)
    parent_version: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


@dataclass
class ModelBundle:
    """A loaded or freshly trained model. Invariant: ``labels == head.classes``."""

    body: SentenceTransformer
    head: LinearHead
    metadata: ModelMetadata
    normalize_embeddings: bool = False
    examples: list[Example] = field(default_factory=list)
    directory: Path | None = None  # where it was loaded from (None when trained in memory)

    @property
    def labels(self) -> list[str]:
        return list(self.head.classes)

    @property
    def version(self) -> str:
        return self.metadata.version


def new_version_id(now: datetime | None = None) -> str:
    """A sortable, unique version id: UTC timestamp plus 8 random hex digits."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- the pickled head


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Prefix a :class:`ModelError` raised inside with the file it is about (same class)."""
    try:
        yield
    except ModelError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _head_from_pickle(path: Path, labels: list[str] | None, *, trusted: bool) -> LinearHead:
    try:
        with _naming(path):
            obj = load_restricted(path)
    except UnsafeModelError as exc:
        if not trusted:
            raise UnsafeModelError(
                f"{exc}. Unpickling it fully can run arbitrary code: only if you made or trust this "
                "directory, pass --trusted (setting model.trusted=true)"
            ) from None
        return _head_from_trusted_pickle(path, labels)
    if not isinstance(obj, Captured):
        raise ModelError(f"{path}: the head pickle holds {type(obj).__name__}, not a LogisticRegression")
    with _naming(path):
        return head_from_state(type(obj).kind, vars(obj), labels)


def _head_from_trusted_pickle(path: Path, labels: list[str] | None) -> LinearHead:
    log_event(log, "model_head_unrestricted_unpickle", level=logging.WARNING, path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = joblib.load(path)
    except ModuleNotFoundError as exc:
        raise ModelError(f"{path}: the head needs the missing module {exc.name!r}") from None
    except Exception as exc:  # the pickle's own code failed: a broken or foreign file
        raise ModelError(f"{path}: unpickling the head failed ({type(exc).__name__}: {exc})") from None
    if type(obj).__name__ == "SetFitHead":
        raise ModelError(f"{path}: {CONVERT_SETFIT_HEAD_HELP}")
    with _naming(path):
        return LinearHead.from_sklearn(obj, labels)


# --------------------------------------------------------------------------- safe head format


def _write_safe_head(head: LinearHead, directory: Path, pickle_sha256: str) -> None:
    save_file(
        {"coef": np.ascontiguousarray(head.coef), "intercept": np.ascontiguousarray(head.intercept)},
        str(directory / SAFE_HEAD_TENSORS),
    )
    spec = {
        "format": SAFE_HEAD_FORMAT,
        "format_version": SAFE_HEAD_FORMAT_VERSION,
        "classes": head.classes,
        "multi_class": head.multi_class,
        "model_head_pkl_sha256": pickle_sha256,
        **head.calibration_json(),  # temperature, thresholds: only when not the defaults
    }
    (directory / SAFE_HEAD_JSON).write_text(json.dumps(spec, indent=2), encoding="utf-8")


def _unreadable_safe_head(path: Path, detail: str) -> ModelError:
    return ModelError(f"{path}: unreadable safe head ({detail}); delete head.json to use model_head.pkl")


def _read_safe_head(directory: Path) -> LinearHead | None:
    """The safe head, or None when absent or stale (the pickle changed since it was written)."""
    spec_path, tensors_path = directory / SAFE_HEAD_JSON, directory / SAFE_HEAD_TENSORS
    if not spec_path.is_file() or not tensors_path.is_file():
        return None
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise _unreadable_safe_head(spec_path, f"{type(exc).__name__}: {exc}") from None
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors' own error type, OSError, numpy's dtype errors, ...
        raise _unreadable_safe_head(tensors_path, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(spec, dict):
        raise ModelError(f"{spec_path}: not a JSON object; delete head.json to use model_head.pkl")
    if spec.get("format") != SAFE_HEAD_FORMAT or spec.get("format_version") != SAFE_HEAD_FORMAT_VERSION:
        found = f"{spec.get('format')!r} v{spec.get('format_version')!r}"
        raise ModelError(f"{spec_path}: unknown head format {found}; upgrade stream-classifier")
    pkl = directory / SETFIT_HEAD
    if pkl.is_file() and spec.get("model_head_pkl_sha256") != sha256_file(pkl):
        log_event(log, "model_safe_head_stale", level=logging.WARNING, path=str(directory))
        return None
    missing = sorted({"coef", "intercept"} - tensors.keys())
    if missing:
        raise _unreadable_safe_head(tensors_path, f"no {' or '.join(missing)} tensor")
    with _naming(directory):
        return LinearHead(
            coef=tensors["coef"],
            intercept=tensors["intercept"],
            classes=spec.get("classes", []),  # checked by LinearHead
            multi_class=spec.get("multi_class", "multinomial"),
            **calibration_from_json(spec),
        )


# --------------------------------------------------------------------------- bodies


def load_body(name_or_path: str | Path, device: str = "cpu") -> SentenceTransformer:
    """A sentence-transformers body from a local directory (any model dir) or a hub id."""
    text = str(name_or_path)
    local = Path(text).expanduser()
    try:
        if local.exists():
            if not (local / "modules.json").is_file() and not (local / "config.json").is_file():
                raise ModelError(f"{local}: not a sentence-transformers model directory (no modules.json)")
            return SentenceTransformer(str(local), device=device)
        return SentenceTransformer(text, device=device)
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the sentence-transformers model {text!r}: {exc}. Give a local model "
            "directory, or a hub id with network access (HF_HUB_OFFLINE must be unset)"
        ) from None


# --------------------------------------------------------------------------- load / save


def _read_setfit_config(directory: Path) -> tuple[list[str] | None, bool]:
    path = directory / SETFIT_CONFIG
    if not path.is_file():
        return None, False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ModelError(
            f'{path}: not a JSON object; setfit writes {{"labels": [...], "normalize_embeddings": ...}}'
        )
    labels = config.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise ModelError(f"{path}: 'labels' must be a list of strings, the class names in column order")
    normalize = config.get("normalize_embeddings", False)
    if not isinstance(normalize, bool):
        raise ModelError(f"{path}: 'normalize_embeddings' must be true or false, not {normalize!r}")
    return labels, normalize


def load_head(directory: Path | str, *, trusted: bool = False) -> tuple[LinearHead, bool]:
    """The head and ``normalize_embeddings`` of a model directory (no body loaded)."""
    directory = Path(directory)
    labels, normalize = _read_setfit_config(directory)
    head = _read_safe_head(directory)
    if head is None:
        pkl = directory / SETFIT_HEAD
        if not pkl.is_file():
            raise ModelError(
                f"{directory}: no classification head (model_head.pkl or head.safetensors); "
                "is this a plain sentence-transformers model? Train one with `stream-classifier train`"
            )
        head = _head_from_pickle(pkl, labels, trusted=trusted)
    return head, normalize


def _read_metadata(directory: Path, head: LinearHead) -> ModelMetadata:
    path = directory / METADATA_FILE
    if path.is_file():
        try:
            return ModelMetadata.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: invalid metadata ({exc})") from None
    # A directory saved by setfit itself: derive a stable version from the head file.
    source = directory / SETFIT_HEAD if (directory / SETFIT_HEAD).is_file() else directory / SAFE_HEAD_TENSORS
    mtime = datetime.fromtimestamp(source.stat().st_mtime, UTC)
    return ModelMetadata(
        version=f"setfit-{sha256_file(source)[:12]}",
        created_at=mtime.isoformat(timespec="seconds").replace("+00:00", "Z"),
        base_model=str(directory),
        labels=head.classes,
    )


def load_model(path: Path | str, *, trusted: bool = False, device: str = "cpu") -> ModelBundle:
    """Load a model directory (ours or setfit's). Raises :class:`ModelError` saying what to do."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelError(f"{directory}: no such model directory")
    head, normalize = load_head(directory, trusted=trusted)
    body = load_body(directory, device=device)
    dimension = getattr(body, "get_embedding_dimension", None) or body.get_sentence_embedding_dimension
    dim = dimension()
    if dim is not None and dim != head.dim:
        raise ModelError(f"{directory}: the head expects {head.dim}-d embeddings but the body makes {dim}-d")
    examples_path = directory / EXAMPLES_FILE
    examples = read_examples(examples_path).examples if examples_path.is_file() else []
    return ModelBundle(
        body=body,
        head=head,
        metadata=_read_metadata(directory, head),
        normalize_embeddings=normalize,
        examples=examples,
        directory=directory,
    )


def _write_examples(examples: list[Example], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            row = {"text": example.text, "label": example.label}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_model(bundle: ModelBundle, path: Path | str, *, overwrite: bool = False, int8: bool = False) -> Path:
    """Write ``bundle`` as a setfit-compatible directory (plus safe head, metadata, examples,
    and with ``int8`` the int8 body built from the saved body: needs the [int8] extra).

    The directory appears complete or not at all: it is written beside ``path`` and renamed.
    """
    target = Path(path).expanduser()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ModelError(f"{target} exists and is not empty: choose a new output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        bundle.body.save(str(staging), create_model_card=False)
        labels = bundle.labels
        config = {"normalize_embeddings": bundle.normalize_embeddings, "labels": labels}
        (staging / SETFIT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        joblib.dump(bundle.head.to_sklearn(np.arange(len(labels))), staging / SETFIT_HEAD)
        _write_safe_head(bundle.head, staging, sha256_file(staging / SETFIT_HEAD))
        # Re-validated: callers may have updated fields with plain dicts via model_copy(update=...).
        metadata = ModelMetadata.model_validate({**dict(bundle.metadata), "labels": labels})
        (staging / METADATA_FILE).write_text(metadata.model_dump_json(indent=2), encoding="utf-8")
        _write_examples(bundle.examples, staging / EXAMPLES_FILE)
        if int8:
            ensure_artifact(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log_event(log, "model_saved", path=str(target), version=bundle.version, labels=labels, int8=int8)
    return target
