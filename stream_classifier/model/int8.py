"""int8 mode on the CPU: the body exported to ONNX, dynamically quantised, run by ONNX Runtime.

torch's own dynamic quantisation (deprecated in recent torch) gains only ~1.4x on a 2-core
AVX2 CPU; ONNX Runtime's int8 kernels gain ~1.8x on the same body (docs/performance.md).

Invariants:

- the export and quantisation happen at load time, from the loaded body, in a temporary
  directory; nothing is written to the model directory, which may be read-only;
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
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sentence_transformers import SentenceTransformer

from stream_classifier.errors import ModelError

INSTALL_HINT = "int8 mode runs the body on ONNX Runtime: pip install 'stream-classifier[int8]'"
ONNX_OPSET = 17


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


class Int8Body:
    """An ONNX Runtime session computing the body's sentence embeddings with int8 weights."""

    def __init__(self, session: Any, names: list[str]) -> None:
        self._session = session
        self._names = names

    @classmethod
    def from_body(cls, body: SentenceTransformer, sample: dict[str, torch.Tensor], threads: int) -> Int8Body:
        """Export ``body`` with ``sample``'s inputs (any batch and length), quantise, load."""
        try:
            import onnx  # noqa: F401, PLC0415 - optional extra [int8]
            import onnxruntime  # noqa: PLC0415
        except ImportError:
            raise ModelError(INSTALL_HINT) from None
        with tempfile.TemporaryDirectory(prefix="stream-classifier-int8-") as tmp:
            exported, quantised = Path(tmp) / "body.onnx", Path(tmp) / "body.int8.onnx"
            export_body(body.cpu(), sample, exported)
            quantise(exported, quantised)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                str(quantised), options, providers=["CPUExecutionProvider"]
            )
        return cls(session, list(sample))

    def __call__(self, features: dict[str, torch.Tensor]) -> NDArray[np.float32]:
        feeds = {name: features[name].numpy() for name in self._names}
        (embeddings,) = self._session.run(["sentence_embedding"], feeds)
        result: NDArray[np.float32] = embeddings
        return result
