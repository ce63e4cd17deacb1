"""The bench's in-process stages: the texts, the bare runtime, the precisions, setfit."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream_classifier.bench.options import BenchOptions
from stream_classifier.model.format import save_model
from stream_classifier.model.precision import choose_cpu_precision
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.training import TrainingConfig, train_model
from stream_classifier.samples import build_random_body, require_offline_minilm, sample_examples

logger = logging.getLogger(__name__)

PRECISION_ROUNDS = 3  # interleaved rate measurements per precision variant


# --------------------------------------------------------------------------- inputs


DISTINCT_TEXTS = 600  # the bundled sample's train + eval rows, which bench_texts cycles through


def bench_texts(n: int, words: int) -> list[str]:
    """``n`` distinct texts from the bundled sample, each cut to ``words`` words and numbered."""

    base = [" ".join(e.text.split()[:words]) for e in sample_examples("train") + sample_examples("eval")]
    assert len(base) == DISTINCT_TEXTS
    return [f"{base[i % len(base)]} #{i}" for i in range(n)]


def length_distribution(runtime: Any, texts: Sequence[str]) -> dict[str, float]:
    """Token counts (with special tokens, after truncation) of ``texts``."""
    tokenizer = runtime.bundle.body.tokenizer
    encoded = tokenizer(list(texts), truncation=True, max_length=runtime.max_seq_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    return {
        "mean": round(float(lengths.mean()), 1),
        "p10": float(np.percentile(lengths, 10)),
        "p50": float(np.percentile(lengths, 50)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


def prepare_model(options: BenchOptions, workdir: Path) -> tuple[Path, str]:
    """The model directory to benchmark and a description of it."""
    if options.model is not None:
        return options.model, f"model directory {options.model}"

    if options.random_arch is not None:
        body: str = str(
            build_random_body(
                options.random_arch,
                options.tokenizer
                or require_offline_minilm("pass --tokenizer DIR (e.g. benchmarks/tokenizer)"),
                workdir / "body",
            )
        )
        described = f"random-init {options.random_arch}-sized BERT body, head fitted on its embeddings"
    else:
        body = str(require_offline_minilm("pass --model DIR"))
        described = "all-MiniLM-L6-v2 (offline) + head fitted on the bundled sample (no body steps)"
    config = TrainingConfig(head_only=True, show_progress_bar=False)
    device = options.device if options.device != "auto" else "cpu"
    bundle = train_model(sample_examples("train"), body, config, device=device)
    return save_model(bundle, workdir / "model"), described


# --------------------------------------------------------------------------- stages


def rate(runtime: Any, texts: Sequence[str], batch: int, min_seconds: float) -> float:
    """Messages per second of prepare+infer at ``batch``: whole passes over ``texts``, for
    ``min_seconds`` or more, so that the rate is for their whole length mix (the pipeline's)
    rather than for the first few batches'."""
    runtime.predict_proba(texts[:batch])  # warm this shape
    done, started = 0, time.perf_counter()
    while True:
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            runtime.predict_proba(chunk)
            done += len(chunk)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def stage_bare(
    runtime: Any, texts: Sequence[str], batch_sizes: Sequence[int], min_s: float
) -> dict[str, Any]:
    rates = {b: round(rate(runtime, texts, b, min_s), 1) for b in batch_sizes}
    best = max(rates, key=lambda b: rates[b])
    return {"msg_per_s": rates[best], "best_batch": best, "by_batch": rates}


def stage_precision(
    model_dir: Path,
    reference: Any,
    texts: Sequence[str],
    *,
    device: str,
    batch: int,
    variants: Sequence[str],
    min_s: float,
) -> dict[str, Any]:
    if reference.precision != "fp32" or reference.quantize != "none":
        reference = ModelRuntime.load(model_dir, device=device, precision="fp32")
        reference.warmup()
    evals = sample_examples("eval")
    eval_texts = [e.text for e in evals]
    truth = np.array([e.label for e in evals])
    ref_probs = reference.predict_proba(texts[:512])

    def accuracy(runtime: Any) -> float:
        predicted = np.array(runtime.predict(eval_texts))
        return round(float((predicted == truth).mean()), 4)

    runtimes: dict[str, Any] = {"fp32": reference}
    out: dict[str, Any] = {"fp32": {"accuracy": accuracy(reference)}}
    if reference.device.type == "cpu":  # what precision auto picks here, with its probe's figures
        out["auto"] = choose_cpu_precision(reference, "auto").as_fields()
    for variant in variants:
        if variant == "fp32":
            continue
        quantize = "int8" if variant == "int8" else "none"
        precision = "fp32" if variant == "int8" else variant
        try:
            runtime = ModelRuntime.load(model_dir, device=device, precision=precision, quantize=quantize)
        except Exception as exc:
            out[variant] = {"skipped": repr(exc)}
            continue
        runtime.warmup()
        diff = float(np.abs(runtime.predict_proba(texts[:512]) - ref_probs).max())
        runtimes[variant] = runtime
        out[variant] = {"max_prob_diff_vs_fp32": round(diff, 5), "accuracy": accuracy(runtime)}
    # Interleaved rounds, so that the machine's drift (±10 % over minutes on a shared VM)
    # hits every variant alike; each variant's rate is its median round.
    rounds: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(PRECISION_ROUNDS):
        for name, runtime in runtimes.items():
            rounds[name].append(round(rate(runtime, texts, batch, min_s), 1))
    for name, rates in rounds.items():
        out[name] |= {"msg_per_s": statistics.median(rates), "rounds": rates}
    return out


def stage_setfit(
    model_dir: Path, texts: Sequence[str], *, python: str | None, device: str, timeout_s: float
) -> dict[str, Any]:
    if python is None:
        if importlib.util.find_spec("setfit") is None:
            return {"skipped": "setfit is not installed; pass --setfit-python PATH to a Python that has it"}
        python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.json"
        path.write_text(json.dumps(list(texts[:512])))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            done = subprocess.run(
                [python, str(Path(__file__).with_name("setfit_rates.py")), str(model_dir), str(path), device],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"skipped": f"setfit did not finish within {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"skipped": f"setfit failed: {done.stderr.strip().splitlines()[-1:]}"}
    rates = {int(k): round(v, 1) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    best = max(rates, key=lambda b: rates[b])
    return {
        "msg_per_s": rates[best],
        "best_batch": best,
        "by_batch": rates,
        "one_at_a_time_msg_per_s": rates.get(1),
    }
