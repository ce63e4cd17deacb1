"""The bench driver: runs the stages in order, times each, and reports ratios from the same run."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from stream_classifier.bench.broker_stages import (
    bench_broker,
    stage_latency,
    stage_naive,
    stage_outputs,
    stage_pipeline,
)
from stream_classifier.bench.options import BenchOptions, Results
from stream_classifier.bench.stages import (
    DISTINCT_TEXTS,
    bench_texts,
    length_distribution,
    prepare_model,
    rate,
    stage_bare,
    stage_precision,
    stage_setfit,
)
from stream_classifier.model.precision import REPORTED_FLAGS, read_cpu_flags
from stream_classifier.model.runtime import ModelRuntime, on_a_passing_thread, resolve_device
from stream_classifier.transport.kafka_python import crc32c_implementation

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- driver


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), cpu)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_features": sorted(set(REPORTED_FLAGS) & read_cpu_flags()),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kafka_python_crc32c": crc32c_implementation(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _timed(
    results: Results, name: str, out: TextIO, fn: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    out.write(f"[bench] {name} ...\n")
    out.flush()
    started = time.monotonic()
    try:
        # Each stage's torch work on its own passing thread, so that the pipeline's serving
        # thread is the only CPU pool while it runs, as in `serve` (on_a_passing_thread).
        value = on_a_passing_thread(fn)
    except Exception as exc:
        logger.exception("bench stage %s failed", name)
        value = {"failed": f"{type(exc).__name__}: {exc}"}
    value["stage_seconds"] = round(time.monotonic() - started, 1)
    results.stages[name] = value
    if results.path is not None:  # partial results survive a stage that is killed later
        results.ratios = ratios(results.stages)
        write_results(results, results.path)
    out.write(f"[bench] {name}: {json.dumps(value)}\n")
    out.flush()
    return value


def run_bench(options: BenchOptions, out: TextIO) -> Results:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = str(resolve_device(options.device))
    on_gpu = device.startswith("cuda")
    n = options.messages or (
        (20_000 if on_gpu else 1_000) if options.quick else (100_000 if on_gpu else 4_000)
    )
    min_s = 1.0 if options.quick else 3.0
    batch_sizes = options.batch_sizes or ((32, 128, 256, 512) if on_gpu else (1, 16, 32, 64, 128))
    variants = options.precisions or (("fp32", "fp16", "bf16") if on_gpu else ("fp32", "bf16", "int8"))
    results = Results(path=options.output)
    with tempfile.TemporaryDirectory(prefix="stream-classifier-bench-") as tmp:
        model_dir, described = on_a_passing_thread(lambda: prepare_model(options, Path(tmp)))

        def load() -> ModelRuntime:
            loaded = ModelRuntime.load(model_dir, device=device, precision=options.precision)
            loaded.warmup()
            return loaded

        runtime = on_a_passing_thread(load)
        texts = bench_texts(n, options.words)
        results.meta = {
            "command": " ".join(["stream-classifier", *sys.argv[1:]]) if sys.argv else "",
            "model": described,
            "version": runtime.version,
            "device": device,
            "precision": runtime.precision,
            "messages": n,
            "text_tokens": length_distribution(runtime, texts[:2_000]),
            "text_source": f"bundled SpamAssassin sample, cut to {options.words} words, numbered",
            "machine": _machine(),
        }
        out.write(f"[bench] {json.dumps(results.meta)}\n")
        # On the CPU, every distinct bundled text once (the pipeline's texts cycle through them).
        bench_sample = texts[: min(len(texts), 4_096 if on_gpu else DISTINCT_TEXTS)]
        stages = set(options.stages)
        bare = (
            _timed(results, "bare", out, lambda: stage_bare(runtime, bench_sample, batch_sizes, min_s))
            if "bare" in stages
            else None
        )
        batch = int(bare["best_batch"]) if bare and "best_batch" in bare else batch_sizes[-1]
        if "precision" in stages:
            _timed(
                results,
                "precision",
                out,
                lambda: stage_precision(
                    model_dir,
                    runtime,
                    bench_sample,
                    device=device,
                    batch=batch,
                    variants=variants,
                    min_s=min_s,
                ),
            )
        with bench_broker(options.bootstrap_servers) as bootstrap:
            for transport in options.transports if "pipeline" in stages else ():
                _timed(
                    results,
                    f"pipeline[{transport}]",
                    out,
                    functools.partial(
                        stage_pipeline,
                        bootstrap,
                        runtime,
                        texts,
                        transport=transport,
                        batch=batch,
                        timeout_s=options.stage_timeout_s,
                        bare_rate=lambda: rate(runtime, bench_sample, batch, min_s),
                    ),
                )
            if "outputs" in stages:  # not a default stage: plain vs routed + include_input=original
                _timed(
                    results,
                    "outputs",
                    out,
                    functools.partial(
                        stage_outputs,
                        bootstrap,
                        runtime,
                        texts,
                        transport=options.transports[0],
                        batch=batch,
                        timeout_s=options.stage_timeout_s,
                    ),
                )
            if "naive" in stages:
                seconds = 5.0 if options.quick else 15.0
                _timed(results, "naive", out, lambda: stage_naive(bootstrap, runtime, texts[:5_000], seconds))
            if "latency" in stages:
                peak = max(
                    (v.get("msg_per_s", 0.0) for k, v in results.stages.items() if k.startswith("pipeline")),
                    default=0.0,
                ) or (bare or {}).get("msg_per_s", 100.0)
                transport = options.transports[0]
                seconds = 5.0 if options.quick else 15.0
                _timed(
                    results,
                    "latency",
                    out,
                    lambda: stage_latency(
                        bootstrap,
                        runtime,
                        texts,
                        transport=transport,
                        batch=batch,
                        rate=0.5 * peak,
                        seconds=seconds,
                    ),
                )
        if "setfit" in stages:
            _timed(
                results,
                "setfit",
                out,
                lambda: stage_setfit(
                    model_dir,
                    bench_sample,
                    python=options.setfit_python,
                    device=device,
                    timeout_s=options.stage_timeout_s,
                ),
            )
    results.ratios = ratios(results.stages)
    return results


def ratios(stages: dict[str, Any]) -> dict[str, float]:
    """The targets' ratios, from the stages of one run."""

    def rate(name: str) -> float | None:
        value = stages.get(name, {}).get("msg_per_s")
        return float(value) if value else None

    found: dict[str, float] = {}
    bare, naive = rate("bare"), rate("naive")
    for name, stage in stages.items():
        if name.startswith("pipeline"):
            pipeline = rate(name)
            # Against the bare rate measured around this stage when it was (stage_pipeline).
            around = [stage[k] for k in ("bare_before", "bare_after") if stage.get(k)]
            reference = statistics.fmean(around) if len(around) == 2 else bare
            if pipeline and reference:
                found[f"{name}/bare"] = round(pipeline / reference, 3)
            if pipeline and naive:
                found[f"{name}/naive"] = round(pipeline / naive, 2)
    precision = stages.get("precision", {})
    fp32 = precision.get("fp32", {})
    for variant, values in precision.items():
        if not isinstance(values, dict) or variant == "fp32":
            continue
        if values.get("msg_per_s") and fp32.get("msg_per_s"):
            found[f"{variant}/fp32"] = round(values["msg_per_s"] / fp32["msg_per_s"], 2)
            found[f"{variant}_accuracy_delta_points"] = round(
                100 * (values["accuracy"] - fp32["accuracy"]), 2
            )
    if stages.get("outputs", {}).get("enriched_vs_plain"):
        found["outputs enriched/plain"] = float(stages["outputs"]["enriched_vs_plain"])
    setfit = rate("setfit")
    if setfit and bare:
        found["bare/setfit"] = round(bare / setfit, 2)
    return found


def format_table(results: Results) -> str:
    rows = [("stage", "msg/s", "detail")]
    for name, value in results.stages.items():
        if name == "precision":
            for variant, v in value.items():
                if variant == "auto" and isinstance(v, dict):
                    rows.append(("auto picks", str(v.get("precision")), str(v.get("reason"))))
                elif isinstance(v, dict):
                    detail = ", ".join(
                        f"{k}={v[k]}" for k in ("accuracy", "max_prob_diff_vs_fp32", "skipped") if k in v
                    )
                    rows.append((f"bare {variant}", str(v.get("msg_per_s", "-")), detail))
            continue
        detail_keys = (
            "best_batch",
            "bare_before",
            "bare_after",
            "p50_ms",
            "p99_ms",
            "target_msg_per_s",
            "skipped",
            "failed",
            "incomplete",
        )
        detail = ", ".join(f"{k}={value[k]}" for k in detail_keys if k in value)
        rows.append((name, str(value.get("msg_per_s", "-")), detail))
    rows += [(f"ratio {k}", str(v), "") for k, v in results.ratios.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def write_results(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": results.meta,
        "stages": results.stages,
        "ratios": results.ratios,
        "notes": results.notes,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
