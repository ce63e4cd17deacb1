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
- ``training_examples.jsonl``: the kept training examples (capped per label).

Invariants:

- ``model_head.pkl`` is never unpickled without restriction unless the caller passes
  ``trusted=True``. The restricted reader resolves only the numpy/joblib array classes and
  stand-ins for the scikit-learn estimator classes, whose attributes it captures as plain
  data; anything else raises before it is called.
- ``head.json`` records the sha256 of the ``model_head.pkl`` saved with it; if the pickle
  was replaced since, the pickle is the truth and is read (restricted) instead.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import secrets
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler, _validate_fileobject_and_memmap
from pydantic import BaseModel, Field
from safetensors.numpy import load_file, save_file
from sentence_transformers import SentenceTransformer

from stream_classifier.errors import ModelError, UnsafeModelError
from stream_classifier.model.examples import Example, read_examples
from stream_classifier.model.head import LinearHead, head_from_state
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

CONVERT_SETFIT_HEAD_HELP = (
    "this model has a setfit differentiable head (SetFitHead), which stream-classifier cannot "
    "read without the setfit package. Convert it once, where setfit is installed: load it with "
    "SetFitModel.from_pretrained(DIR) and replace model_head with a LogisticRegression whose "
    "coef_/intercept_ are model_head.linear's weight/bias and classes_ = numpy.arange(k) (exact "
    "for out_features > 1 and temperature 1), then save it; or retrain with a LogisticRegression "
    "head (see README: 'Models, training and the command line')"
)


class TrainingData(BaseModel):
    """Size and fingerprint of the data a model was trained on."""

    n: int = 0
    sha256: str = ""


class ModelMetadata(BaseModel):
    """What a model directory says about itself (``model_metadata.json``)."""

    version: str
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


# --------------------------------------------------------------------------- restricted unpickling


class _Captured:
    """Stand-in for a scikit-learn class: keeps the pickled attributes, runs nothing."""

    kind = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state for {self.kind}")
        self.__dict__.update(state)


class _CapturedLogisticRegression(_Captured):
    kind = "LogisticRegression"


class _CapturedOneVsRest(_Captured):
    kind = "OneVsRestClassifier"


class _CapturedLabelBinarizer(_Captured):
    kind = "LabelBinarizer"


_SKLEARN_STANDINS: dict[str, type[_Captured]] = {
    "LogisticRegression": _CapturedLogisticRegression,
    "OneVsRestClassifier": _CapturedOneVsRest,
    "LabelBinarizer": _CapturedLabelBinarizer,
}
_NUMPY_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _DisallowedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


def _restricted_find_class(module: str, name: str) -> Any:
    if module.startswith("sklearn.") and name in _SKLEARN_STANDINS:
        return _SKLEARN_STANDINS[name]
    if (module, name) in _NUMPY_ALLOWED:
        return getattr(importlib.import_module(module), name)
    if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
        return _SafeArrayWrapper
    raise _DisallowedGlobal(module, name)


class _RestrictedPickleUnpickler(pickle.Unpickler):
    """Plain pickle stream (joblib's nested object arrays) under the same restriction."""

    def find_class(self, module: str, name: str) -> Any:
        return _restricted_find_class(module, name)


class _SafeArrayWrapper(NumpyArrayWrapper):  # type: ignore[misc]
    """joblib's array wrapper, reading object arrays through the restricted resolver too."""

    def read_array(self, unpickler: Any, ensure_native_byte_order: Any) -> Any:
        if self.dtype.hasobject:
            return _RestrictedPickleUnpickler(unpickler.file_handle).load()
        return super().read_array(unpickler, ensure_native_byte_order)


class _RestrictedNumpyUnpickler(NumpyUnpickler):  # type: ignore[misc]
    def find_class(self, module: str, name: str) -> Any:
        return _restricted_find_class(module, name)


def _restricted_joblib_load(path: Path) -> Any:
    with path.open("rb") as handle, _validate_fileobject_and_memmap(handle, str(path), None) as (fobj, _):
        if isinstance(fobj, str):  # joblib < 0.10 companion-file format
            raise pickle.UnpicklingError("joblib format older than 0.10 is not supported")
        return _RestrictedNumpyUnpickler(str(path), fobj, "auto").load()


def _head_from_pickle(path: Path, labels: list[str] | None, *, trusted: bool) -> LinearHead:
    try:
        obj = _restricted_joblib_load(path)
    except _DisallowedGlobal as exc:
        if exc.name == "SetFitHead" or exc.module.startswith("setfit"):
            raise ModelError(f"{path}: {CONVERT_SETFIT_HEAD_HELP}") from None
        if not trusted:
            raise UnsafeModelError(
                f"{path} needs {exc.module}.{exc.name}, which the safe head reader does not allow. "
                "Unpickling it fully can run arbitrary code: only if you made or trust this "
                "directory, pass --trusted (setting model.trusted=true)"
            ) from None
        return _head_from_trusted_pickle(path, labels)
    except Exception as exc:  # a corrupt pickle fails in many ways (struct, EOF, value, ...)
        raise ModelError(f"{path}: not a readable joblib head pickle ({exc})") from None
    if not isinstance(obj, _Captured):
        raise ModelError(f"{path}: the head pickle holds {type(obj).__name__}, not a LogisticRegression")
    return head_from_state(obj.kind, vars(obj), labels)


def _head_from_trusted_pickle(path: Path, labels: list[str] | None) -> LinearHead:
    log_event(log, "model_head_unrestricted_unpickle", level=logging.WARNING, path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = joblib.load(path)
    except ModuleNotFoundError as exc:
        raise ModelError(f"{path}: the head needs the missing module {exc.name!r}") from None
    if type(obj).__name__ == "SetFitHead":
        raise ModelError(f"{path}: {CONVERT_SETFIT_HEAD_HELP}")
    return LinearHead.from_sklearn(obj, labels)


# --------------------------------------------------------------------------- safe head format


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    }
    (directory / SAFE_HEAD_JSON).write_text(json.dumps(spec, indent=2), encoding="utf-8")


def _read_safe_head(directory: Path) -> LinearHead | None:
    """The safe head, or None when absent or stale (the pickle changed since it was written)."""
    spec_path = directory / SAFE_HEAD_JSON
    if not spec_path.is_file() or not (directory / SAFE_HEAD_TENSORS).is_file():
        return None
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / SAFE_HEAD_TENSORS))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{directory}: unreadable safe head ({exc}); delete head.json to use model_head.pkl"
        ) from None
    if spec.get("format") != SAFE_HEAD_FORMAT or spec.get("format_version") != SAFE_HEAD_FORMAT_VERSION:
        found = f"{spec.get('format')!r} v{spec.get('format_version')!r}"
        raise ModelError(f"{spec_path}: unknown head format {found}; upgrade stream-classifier")
    pkl = directory / SETFIT_HEAD
    if pkl.is_file() and spec.get("model_head_pkl_sha256") != _sha256_file(pkl):
        log_event(log, "model_safe_head_stale", level=logging.WARNING, path=str(directory))
        return None
    return LinearHead(
        coef=np.asarray(tensors["coef"], dtype=np.float64),
        intercept=np.asarray(tensors["intercept"], dtype=np.float64),
        classes=[str(c) for c in spec["classes"]],
        multi_class=spec.get("multi_class", "multinomial"),
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
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    labels = config.get("labels")
    if labels is not None:
        labels = [str(label) for label in labels]
    return labels, bool(config.get("normalize_embeddings", False))


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
        version=f"setfit-{_sha256_file(source)[:12]}",
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
    )


def _write_examples(examples: list[Example], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            row = {"text": example.text, "label": example.label}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_model(bundle: ModelBundle, path: Path | str, *, overwrite: bool = False) -> Path:
    """Write ``bundle`` as a setfit-compatible directory (plus safe head, metadata, examples).

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
        _write_safe_head(bundle.head, staging, _sha256_file(staging / SETFIT_HEAD))
        # Re-validated: callers may have updated fields with plain dicts via model_copy(update=...).
        metadata = ModelMetadata.model_validate({**dict(bundle.metadata), "labels": labels})
        (staging / METADATA_FILE).write_text(metadata.model_dump_json(indent=2), encoding="utf-8")
        _write_examples(bundle.examples, staging / EXAMPLES_FILE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log_event(log, "model_saved", path=str(target), version=bundle.version, labels=labels)
    return target
