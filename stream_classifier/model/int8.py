"""int8 mode on the CPU: the body exported to ONNX, dynamically quantised, run by ONNX Runtime.

torch's own dynamic quantisation (deprecated in recent torch) gains only ~1.4x on a 2-core
AVX2 CPU; ONNX Runtime's int8 kernels gain ~1.8x on the same body (docs/performance.md).

The int8 body is built once and kept in the model directory (:func:`ensure_artifact`, called
when a model is saved with ``int8=True`` or enters the model store configured for int8):

    int8/body.onnx    the quantised ONNX body (pooling and normalisation included)
    int8/int8.json    format, the sha256 of body.onnx, and the fingerprint of the body it
                      was built from (:func:`body_fingerprint`: module types and configs,
                      transformer config, every weight tensor)

Invariants:

- the ``int8/`` directory appears whole or not at all (built beside it, then renamed);
  sentence-transformers and setfit ignore it, and no setfit file changes;
- a runtime uses the artifact only when its fingerprint is the loaded body's and its file
  is the one hashed; otherwise (absent, stale, unreadable) the body is exported and
  quantised in memory, in a temporary directory, as if there were no artifact, and
  nothing is written to the model directory, which may be read-only;
- weights are quantised to int8 per output channel, activations dynamically per tensor; the
  sentence embeddings are the body's own (pooling and normalisation modules included) within
  the int8 tolerance that tests/unit/test_model_runtime.py pins;
- :class:`Int8Body` takes the runtime's padded int64 features and returns the body's
  ``sentence_embedding`` as a float32 numpy array (the runtime's int8 path stays off torch);
- the body is left as it was found: in eval mode, with its attention implementation (switched
  to ``eager`` only for the export, the graph ONNX Runtime recognises) restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sentence_transformers import SentenceTransformer

from stream_classifier.errors import ModelError
from stream_classifier.ops.logs import log_event

log = logging.getLogger(__name__)

INSTALL_HINT = "int8 mode runs the body on ONNX Runtime: pip install 'stream-classifier[int8]'"
ONNX_OPSET = 17
ARTIFACT_DIR = "int8"
ARTIFACT_MODEL = "body.onnx"
ARTIFACT_SPEC = "int8.json"
ARTIFACT_FORMAT = "stream-classifier/int8-body"
ARTIFACT_FORMAT_VERSION = 1
EXPORT_SAMPLE_TEXTS = ("an int8 export sample", "a second, longer sample for the export")
"""Two lengths, so the traced graph sees padding (the shapes stay dynamic)."""
# Config entries that name or describe the files, not what the body computes.
_CONFIG_NOT_COMPUTED = frozenset(
    {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version"}
)


class _SentenceEmbedding(torch.nn.Module):
    """The body with positional inputs (what the ONNX exporter traces)."""

    def __init__(self, body: SentenceTransformer, names: list[str]) -> None:
        super().__init__()
        self.body = body
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = self.body(dict(zip(self.names, inputs, strict=True)))["sentence_embedding"]
        return embeddings


@contextlib.contextmanager
def _eager_attention(body: torch.nn.Module) -> Iterator[None]:
    configs: list[Any] = [
        m.config for m in body.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
    ]
    saved = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = "eager"
        yield
    finally:
        for config, implementation in zip(configs, saved, strict=True):
            config._attn_implementation = implementation


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Drop ONNX Runtime's root-logger advice to pre-process (its symbolic shape inference
    does not complete on transformer bodies; the quantised model is measured without it)."""

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def export_body(body: SentenceTransformer, sample: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``body`` to ``path`` as ONNX with ``sample``'s inputs (any batch and length);
    the body is left as it was found (see the module docstring)."""
    names = list(sample)
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    with _eager_attention(body), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        torch.onnx.export(
            # In eval mode: the exporter restores the wrapper's mode afterwards, and a
            # wrapper in (default) training mode would leave the body in it.
            _SentenceEmbedding(body, names).eval(),
            tuple(sample[name] for name in names),
            str(path),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def quantise(source: Path, target: Path, *, per_channel: bool = True) -> None:
    """Dynamic int8 quantisation of the ONNX model at ``source`` into ``target``."""
    from onnx import TensorProto  # noqa: PLC0415 - optional extra [int8]
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    with _without_preprocessing_advice():
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )


def _import_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401, PLC0415 - optional extra [int8]
        import onnxruntime  # noqa: PLC0415
    except ImportError:
        raise ModelError(INSTALL_HINT) from None
    return onnxruntime


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def body_fingerprint(body: SentenceTransformer) -> str:
    """sha256 of what the exported graph computes from: each module's type and config, the
    transformer's config (less the entries that only name files), every weight tensor."""
    digest = hashlib.sha256()
    for name, module in body.named_children():
        described: Any = getattr(module, "get_config_dict", dict)()
        auto_model = getattr(module, "auto_model", None)
        if auto_model is not None:
            computed = {
                k: v
                for k, v in auto_model.config.to_dict().items()
                if k not in _CONFIG_NOT_COMPUTED and not k.startswith("_")
            }
            described = {"module": described, "model": computed}
        digest.update(
            json.dumps([name, type(module).__name__, described], sort_keys=True, default=str).encode()
        )
    for key, tensor in body.state_dict().items():
        values = tensor.detach().cpu().contiguous()
        digest.update(json.dumps([key, str(values.dtype), list(values.shape)]).encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def export_sample(body: SentenceTransformer) -> dict[str, torch.Tensor]:
    """Padded int64 features of :data:`EXPORT_SAMPLE_TEXTS`, as the runtime feeds them."""
    encoded = body.tokenizer(list(EXPORT_SAMPLE_TEXTS), padding=True, truncation=True, return_tensors="pt")
    names = ("input_ids", "token_type_ids", "attention_mask")
    return {name: encoded[name].to(torch.int64) for name in names if name in encoded}


def build_quantised(body: SentenceTransformer, sample: dict[str, torch.Tensor], target: Path) -> None:
    """Export ``body`` and write its int8 quantisation to ``target`` (the body is left as it was)."""
    _import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="stream-classifier-int8-") as tmp:
        exported = Path(tmp) / "body.onnx"
        export_body(body.cpu(), sample, exported)
        quantise(exported, target)


def read_artifact(directory: Path, fingerprint: str) -> Path | None:
    """``directory``'s int8 model if it was built from the body ``fingerprint`` names and is
    intact; else None, logged (``model_int8_artifact_stale``) when one is there but unusable."""
    spec_path = directory / ARTIFACT_DIR / ARTIFACT_SPEC
    model = directory / ARTIFACT_DIR / ARTIFACT_MODEL
    if not spec_path.is_file():
        return None
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
        if (spec.get("format"), spec.get("format_version")) != (ARTIFACT_FORMAT, ARTIFACT_FORMAT_VERSION):
            raise ValueError(f"format {spec.get('format')!r} v{spec.get('format_version')!r}")
        if spec.get("body_fingerprint") != fingerprint:
            raise ValueError("built from another body (its fingerprint differs from the loaded body's)")
        if spec.get("model_sha256") != sha256_file(model):
            raise ValueError(f"{ARTIFACT_MODEL} is not the file that was hashed")
    except (OSError, ValueError, RecursionError) as exc:
        log_event(
            log, "model_int8_artifact_stale", level=logging.WARNING, path=str(directory), reason=str(exc)
        )
        return None
    return model


def ensure_artifact(directory: Path) -> bool:
    """Build ``directory``'s int8 artifact unless a valid one is there; True when it built one.

    Needs the [int8] extra. Written beside ``int8/`` and renamed into place, so a reader sees
    the old artifact, none, or the new one, whole.
    """
    _import_onnxruntime()
    started = time.perf_counter()
    body = SentenceTransformer(str(directory), device="cpu").eval()
    fingerprint = body_fingerprint(body)
    if read_artifact(directory, fingerprint) is not None:
        return False
    work = Path(tempfile.mkdtemp(prefix=f".{ARTIFACT_DIR}-", dir=directory))
    try:
        build_quantised(body, export_sample(body), work / ARTIFACT_MODEL)
        spec = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "body_fingerprint": fingerprint,
            "model_sha256": sha256_file(work / ARTIFACT_MODEL),
            "onnx_opset": ONNX_OPSET,
            "quantisation": "dynamic; int8 weights per output channel, activations per tensor",
        }
        (work / ARTIFACT_SPEC).write_text(json.dumps(spec, indent=2), encoding="utf-8")
        target = directory / ARTIFACT_DIR
        if target.exists():  # stale: moved aside (one rename), then removed
            old = Path(tempfile.mkdtemp(prefix=f".{ARTIFACT_DIR}-stale-", dir=directory))
            os.replace(target, old / ARTIFACT_DIR)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = round(time.perf_counter() - started, 3)
    log_event(log, "model_int8_artifact_built", path=str(directory), seconds=seconds)
    return True


class Int8Body:
    """An ONNX Runtime session computing the body's sentence embeddings with int8 weights."""

    def __init__(self, session: Any, names: list[str]) -> None:
        self._session = session
        self._names = names

    @classmethod
    def from_file(cls, path: Path, threads: int) -> Int8Body:
        """A session on the quantised ONNX model at ``path``."""
        onnxruntime = _import_onnxruntime()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, [given.name for given in session.get_inputs()])

    @classmethod
    def from_body(cls, body: SentenceTransformer, sample: dict[str, torch.Tensor], threads: int) -> Int8Body:
        """Export ``body`` with ``sample``'s inputs (any batch and length), quantise, load."""
        _import_onnxruntime()
        with tempfile.TemporaryDirectory(prefix="stream-classifier-int8-") as tmp:
            quantised = Path(tmp) / "body.int8.onnx"
            build_quantised(body, sample, quantised)
            return cls.from_file(quantised, threads)

    @classmethod
    def load(
        cls, body: SentenceTransformer, directory: Path | None, sample: dict[str, torch.Tensor], threads: int
    ) -> Int8Body:
        """``directory``'s int8 artifact when it was built from ``body``; else an export of it."""
        _import_onnxruntime()
        started = time.perf_counter()
        stored = read_artifact(directory, body_fingerprint(body)) if directory is not None else None
        loaded = (
            cls.from_file(stored, threads) if stored is not None else cls.from_body(body, sample, threads)
        )
        source = "artifact" if stored is not None else "export"
        seconds = round(time.perf_counter() - started, 3)
        log_event(log, "model_int8_body", source=source, path=str(directory), seconds=seconds)
        return loaded

    def __call__(self, features: dict[str, torch.Tensor]) -> NDArray[np.float32]:
        feeds = {name: features[name].numpy() for name in self._names}
        (embeddings,) = self._session.run(["sentence_embedding"], feeds)
        result: NDArray[np.float32] = embeddings
        return result
