"""`stream-classifier bench`: throughput and latency, every figure from one run.

Stages (each is skipped with a note when it cannot run, never silently):

- ``bare``: :meth:`ModelRuntime.prepare` + :meth:`~ModelRuntime.infer` on the texts at
  several batch sizes; the best one is the bare runtime's throughput;
- ``precision``: the other precisions (``fp16``/``bf16`` on CUDA, ``int8`` on the CPU) at
  that batch size, against fp32 in interleaved rounds (the median round of each):
  throughput, max |p - p_fp32|, accuracy on the bundled eval sample;
- ``pipeline``: a backlog of messages through the real broker and the real service
  (at-least-once), per transport; the rate counts published predictions from the first
  one on (group join and warm-up excluded); its ratio to bare is against the bare rate at
  the same batch measured right before and after it (the VM drifts between stages);
- ``naive``: consume one message, predict it, produce it, wait for the ack, commit; repeat
  (``model_seconds``: the part spent in ``predict_proba``);
- ``setfit``: ``setfit`` ``predict_proba`` on the same model directory (in a subprocess
  with ``--setfit-python``, or in process when setfit is importable);
- ``latency``: a paced producer at half the pipeline's peak; latency is the output's
  timestamp (set when the service produced it) minus the input's send time.

Texts come from the bundled SpamAssassin sample (subject + first sentences), cut to at most
``--words`` words and numbered so that none repeats; their token-length distribution is
part of the result.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from stream_classifier.app import App
from stream_classifier.config import Settings
from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics
from stream_classifier.model.format import save_model
from stream_classifier.model.runtime import ModelRuntime, on_a_passing_thread, resolve_device
from stream_classifier.model.training import TrainingConfig, train_model
from stream_classifier.ops.metrics import Metrics
from stream_classifier.samples import build_random_body, require_offline_minilm, sample_examples
from stream_classifier.transport.kafka_python import crc32c_implementation

logger = logging.getLogger(__name__)

PRECISION_ROUNDS = 3  # interleaved rate measurements per precision variant
_WATCH_S = 0.02  # how often the pipeline stage reads the service's published count


@dataclass
class BenchOptions:
    output: Path
    quick: bool = False
    device: str = "auto"
    precision: str = "auto"
    precisions: Sequence[str] = ()
    transports: Sequence[str] = ("kafka-python", "confluent")
    model: Path | None = None
    random_arch: str | None = None
    tokenizer: Path | None = None
    bootstrap_servers: str | None = None
    messages: int | None = None
    words: int = 24
    batch_sizes: Sequence[int] = ()
    setfit_python: str | None = None
    stages: Sequence[str] = ("bare", "precision", "pipeline", "naive", "setfit", "latency")
    stage_timeout_s: float = 120.0


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


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


def _rate(runtime: Any, texts: Sequence[str], batch: int, min_seconds: float) -> float:
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
    rates = {b: round(_rate(runtime, texts, b, min_s), 1) for b in batch_sizes}
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
            rounds[name].append(round(_rate(runtime, texts, batch, min_s), 1))
    for name, rates in rounds.items():
        out[name] |= {"msg_per_s": statistics.median(rates), "rounds": rates}
    return out


@contextlib.contextmanager
def _broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap is not None:
        yield bootstrap
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


def produce_backlog(bootstrap: str, topic: str, values: Iterable[bytes]) -> None:
    """``values`` on ``topic``, sent in large batches and flushed."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for value in values:
        producer.send(topic, value=value)
    producer.flush(timeout=300)
    producer.close()


def _service_settings(
    bootstrap: str, topics: dict[str, str], runtime: Any, *, transport: str, batch: int
) -> Any:
    return Settings(
        kafka={
            "bootstrap_servers": [bootstrap],
            "group_id": f"bench-{uuid.uuid4().hex[:8]}",
            "input_topics": [topics["in"]],
            "output_topic": topics["out"],
            "dead_letter_topic": topics["dlq"],
            "transport": transport,
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
            "max_poll_records": 2_000,
        },
        model={"device": str(runtime.device), "precision": runtime.precision},
        batching={"max_batch_size": batch, "max_wait_ms": 5, "max_in_flight": max(8 * batch, 8_192)},
        processing={"commit_interval_ms": 100},
        metrics={"lag_refresh_s": 60.0},
    )


def _topics(bootstrap: str, partitions: int) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    topics = {"in": f"bench-in-{tag}", "out": f"bench-out-{tag}", "dlq": f"bench-dlq-{tag}"}
    create_topics(bootstrap, [topics["in"]], partitions=partitions)
    create_topics(bootstrap, [topics["out"], topics["dlq"]], partitions=1)
    return topics


@contextlib.contextmanager
def _running(settings: Any, runtime: Any) -> Iterator[tuple[Any, Callable[[], float]]]:
    """The service on a thread; yields it and a function counting its published predictions."""
    metrics = Metrics(CollectorRegistry())

    def published() -> float:
        return sum(
            sample.value
            for family in metrics.predictions.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    app = App(settings, runtime=runtime, metrics=metrics, ops=False, learning=False)
    with app.running(join_timeout_s=60):
        yield app.wait_started(timeout_s=60), published


def stage_pipeline(
    bootstrap: str,
    runtime: Any,
    texts: Sequence[str],
    *,
    transport: str,
    batch: int,
    timeout_s: float,
    bare_rate: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Drain a backlog of ``texts`` through the service; with ``bare_rate``, the bare runtime's
    rate is measured right before and right after the drain (``bare_before``/``bare_after``),
    and the pipeline's ratio to bare is taken against their mean: the VM's drift over the
    minutes between the bare stage and this one (±10 %) is larger than the gap measured."""
    before = on_a_passing_thread(bare_rate) if bare_rate else None
    topics = _topics(bootstrap, partitions=4)
    n = len(texts)
    produce_backlog(
        bootstrap, topics["in"], [json.dumps({"text": t, "id": str(i)}).encode() for i, t in enumerate(texts)]
    )
    settings = _service_settings(bootstrap, topics, runtime, transport=transport, batch=batch)
    deadline = time.monotonic() + timeout_s
    # Checked every _WATCH_S: often enough for the timing, rarely enough to leave the CPU to
    # the service (reading the counters every 2 ms took 6 % of it on 2 cores).
    with _running(settings, runtime) as (_service, published):
        while published() == 0 and time.monotonic() < deadline:
            time.sleep(_WATCH_S)
        started, first = time.perf_counter(), published()
        while published() < n and time.monotonic() < deadline:
            time.sleep(_WATCH_S)
        elapsed, done = time.perf_counter() - started, published()
    result = {
        "msg_per_s": round((done - first) / elapsed, 1) if elapsed > 0 and done > first else 0.0,
        "messages": n,
        "published": int(done),
        "seconds": round(elapsed, 3),
        "transport": transport,
        "batch": batch,
    }
    if done < n:
        result["incomplete"] = f"stage time limit ({timeout_s:.0f} s) reached"
    if bare_rate is not None and before is not None:
        # Each on a thread of its own: the service's compute thread is then the only CPU pool
        # while it drains (see on_a_passing_thread).
        after = on_a_passing_thread(bare_rate)
        result |= {"bare_before": round(before, 1), "bare_after": round(after, 1)}
    return result


def stage_naive(bootstrap: str, runtime: Any, texts: Sequence[str], seconds: float) -> dict[str, Any]:
    topics = _topics(bootstrap, partitions=1)
    produce_backlog(bootstrap, topics["in"], [json.dumps({"text": t}).encode() for t in texts])
    consumer = KafkaConsumer(
        topics["in"],
        bootstrap_servers=bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=1,
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    done, started, in_model = 0, None, 0.0
    try:
        end = time.monotonic() + seconds + 30
        while time.monotonic() < end:
            for tp, records in consumer.poll(timeout_ms=100, max_records=1).items():
                for record in records:
                    if started is None:
                        started = time.perf_counter()
                        end = time.monotonic() + seconds
                    text = json.loads(record.value)["text"]
                    model_started = time.perf_counter()
                    probabilities = runtime.predict_proba([text])[0]
                    in_model += time.perf_counter() - model_started
                    producer.send(topics["out"], value=json.dumps(probabilities.tolist()).encode()).get(
                        timeout=30
                    )
                    consumer.commit(
                        {TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(record.offset + 1, "", -1)}
                    )
                    done += 1
            if done >= len(texts):
                break
    finally:
        consumer.close()
        producer.close()
    elapsed = time.perf_counter() - started if started is not None else 0.0
    return {
        "msg_per_s": round(done / elapsed, 1) if elapsed else 0.0,
        "messages": done,
        "seconds": round(elapsed, 2),
        # the rest is the client: poll, produce and wait for the ack, commit
        "model_seconds": round(in_model, 2),
    }


def stage_latency(
    bootstrap: str,
    runtime: Any,
    texts: Sequence[str],
    *,
    transport: str,
    batch: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    topics = _topics(bootstrap, partitions=4)
    settings = _service_settings(bootstrap, topics, runtime, transport=transport, batch=batch)
    n = max(1, int(rate * seconds))
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    with _running(settings, runtime) as (_service, published):
        deadline = time.monotonic() + 60
        # Warm the path (group join, first batch), then pace.
        producer.send(topics["in"], value=json.dumps({"text": texts[0], "id": "warmup"}).encode())
        while published() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.perf_counter()
        for i in range(n):
            due = started + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent_ms = time.time() * 1000
            producer.send(
                topics["in"],
                value=json.dumps({"text": texts[i % len(texts)], "id": f"{sent_ms:.3f}"}).encode(),
            )
        producer.flush()
        achieved = n / (time.perf_counter() - started)
        wait_until = time.monotonic() + 60
        while published() < n + 1 and time.monotonic() < wait_until:
            time.sleep(0.01)
    producer.close()
    reader = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    reader.assign([TopicPartition(topics["out"], 0)])
    latencies: list[float] = []
    end = time.monotonic() + 60
    while len(latencies) < n and time.monotonic() < end:
        for records in reader.poll(timeout_ms=200).values():
            for record in records:
                ident = json.loads(record.value)["id"]
                if ident != "warmup":
                    latencies.append(record.timestamp - float(ident))
    reader.close()
    values = np.array(latencies) if latencies else np.array([math.nan])
    return {
        "target_msg_per_s": round(rate, 1),
        "achieved_msg_per_s": round(achieved, 1),
        "messages": n,
        "measured": len(latencies),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
        "transport": transport,
    }


_SETFIT_SCRIPT = r"""
import json, sys, time
from setfit import SetFitModel
model = SetFitModel.from_pretrained(sys.argv[1], device=sys.argv[3])
texts = json.load(open(sys.argv[2]))
best = {}
for batch in (1, 32, 64):
    sample = texts[: 2 * batch] if batch > 1 else texts[:16]
    model.predict_proba(sample[:batch], batch_size=batch)
    start = time.perf_counter()
    model.predict_proba(sample, batch_size=batch)
    best[batch] = len(sample) / (time.perf_counter() - start)
print(json.dumps(best))
"""


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
                [python, "-c", _SETFIT_SCRIPT, str(model_dir), str(path), device],
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


# --------------------------------------------------------------------------- driver


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), cpu)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
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
    variants = options.precisions or (("fp32", "fp16", "bf16") if on_gpu else ("fp32", "int8"))
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
        with _broker(options.bootstrap_servers) as bootstrap:
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
                        bare_rate=lambda: _rate(runtime, bench_sample, batch, min_s),
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
    setfit = rate("setfit")
    if setfit and bare:
        found["bare/setfit"] = round(bare / setfit, 2)
    return found


def format_table(results: Results) -> str:
    rows = [("stage", "msg/s", "detail")]
    for name, value in results.stages.items():
        if name == "precision":
            for variant, v in value.items():
                if isinstance(v, dict):
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
