"""The bench's stages through the real broker and the real service: pipeline, outputs (plain
against routed and enriched), naive, latency."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from stream_classifier.app import App
from stream_classifier.config import DecisionSettings, InputSettings, OutputSettings, Settings
from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics
from stream_classifier.model.runtime import on_a_passing_thread
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.codec import InputDecoder, OutputEncoder, Rejected, published_rows
from stream_classifier.stream.decision import Decider
from stream_classifier.transport.base import Record

logger = logging.getLogger(__name__)

_WATCH_S = 0.02  # how often the pipeline stage reads the service's published count


@contextlib.contextmanager
def bench_broker(bootstrap: str | None) -> Iterator[str]:
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
    bootstrap: str,
    topics: dict[str, str],
    runtime: Any,
    *,
    transport: str,
    batch: int,
    sections: dict[str, Any] | None = None,
) -> Any:
    return Settings(
        **(sections or {}),
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
    sections: Callable[[dict[str, str]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Drain a backlog of ``texts`` through the service; with ``bare_rate``, the bare runtime's
    rate is measured right before and right after the drain (``bare_before``/``bare_after``),
    and the pipeline's ratio to bare is taken against their mean: the VM's drift over the
    minutes between the bare stage and this one (±10 %) is larger than the gap measured.
    ``sections``: more settings sections, from the stage's topics (e.g. routes)."""
    before = on_a_passing_thread(bare_rate) if bare_rate else None
    topics = _topics(bootstrap, partitions=4)
    n = len(texts)
    produce_backlog(
        bootstrap, topics["in"], [json.dumps({"text": t, "id": str(i)}).encode() for i, t in enumerate(texts)]
    )
    extra = sections(topics) if sections is not None else None
    settings = _service_settings(bootstrap, topics, runtime, transport=transport, batch=batch, sections=extra)
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


def _routed_and_enriched(bootstrap: str, runtime: Any) -> Callable[[dict[str, str]], dict[str, Any]]:
    """Settings sections: the first label routed to a topic of its own, the input carried whole."""

    def sections(topics: dict[str, str]) -> dict[str, Any]:
        routed = f"{topics['out']}-routed"
        create_topics(bootstrap, [routed], partitions=1)
        return {"output": {"routes": {runtime.labels[0]: routed}, "include_input": "original"}}

    return sections


def _per_message_us(texts: Sequence[str], labels: Sequence[str], *, enriched: bool, rounds: int = 5) -> float:
    """The I/O thread's own work for one message, decode + decide + route + encode, in
    microseconds (the fastest of ``rounds`` passes: contention only adds time)."""
    output = OutputSettings(include_input="original" if enriched else "none")
    routes = {labels[0]: "routed"} if enriched else {}
    decoder = InputDecoder(InputSettings(), keep_original=enriched)
    encoder = OutputEncoder(output, decisions=False, max_request_size=1_048_576)
    decider = Decider(DecisionSettings())
    records = [
        Record("in", 0, i, None, json.dumps({"text": t, "id": str(i)}).encode(), (), 0)
        for i, t in enumerate(texts)
    ]
    rng = np.random.default_rng(0)
    rows, best = published_rows(rng.dirichlet(np.ones(len(labels)), size=len(records)).astype(np.float32))
    thresholds = decider.thresholds(labels, {})
    fastest = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for record, row, top in zip(records, rows, best, strict=True):
            decoded = decoder.decode(record)
            assert not isinstance(decoded, Rejected)
            decision = decider.decide(labels, row, top, thresholds)
            encoder.encode(
                record,
                decoded,
                labels=labels,
                row=row,
                label=decision.label,
                top_label=decision.top_label,
                abstained=decision.abstained,
                model_version="v",
                topic=routes.get(decision.label, "out"),
            )
        fastest = min(fastest, time.perf_counter() - started)
    return fastest / len(records) * 1e6


def stage_outputs(
    bootstrap: str,
    runtime: Any,
    texts: Sequence[str],
    *,
    transport: str,
    batch: int,
    timeout_s: float,
) -> dict[str, Any]:
    """The pipeline with plain outputs against routing plus ``include_input: original``, in one
    run: plain, enriched, enriched, plain (each drain a fresh backlog and service), so that a
    drift of the machine over the stage cancels out of the ratio. Meaningful with a model that
    leaves the I/O thread the bottleneck (``--random-arch tiny``). Beside the drains, the I/O
    thread's own per-message work (decode, decide, route, encode) is timed in-process for both
    (``io_us_per_message``): a ratio a loaded machine cannot blur."""
    enriched = _routed_and_enriched(bootstrap, runtime)
    runs: dict[str, list[float]] = {"plain": [], "enriched": []}
    notes: list[str] = []
    for kind in ("plain", "enriched", "enriched", "plain"):
        result = stage_pipeline(
            bootstrap,
            runtime,
            texts,
            transport=transport,
            batch=batch,
            timeout_s=timeout_s,
            sections=enriched if kind == "enriched" else None,
        )
        if "incomplete" in result:  # the rate over what was published still counts
            notes.append(f"{kind}: {result['published']} of {len(texts)} ({result['incomplete']})")
        runs[kind].append(float(result["msg_per_s"]))
    plain, rich = (sum(v) / len(v) for v in (runs["plain"], runs["enriched"]))
    sample = list(texts[:2_000])
    timed = {kind: math.inf for kind in ("plain", "enriched")}
    for kind in ("plain", "enriched", "enriched", "plain"):
        timed[kind] = min(timed[kind], _per_message_us(sample, runtime.labels, enriched=kind == "enriched"))
    plain_us, rich_us = timed["plain"], timed["enriched"]
    return {
        **({"incomplete": "; ".join(notes)} if notes else {}),
        "plain_msg_per_s": round(plain, 1),
        "enriched_msg_per_s": round(rich, 1),
        "enriched_vs_plain": round(rich / plain, 3) if plain else 0.0,
        "io_us_per_message": {"plain": round(plain_us, 1), "enriched": round(rich_us, 1)},
        "io_enriched_vs_plain": round(rich_us / plain_us, 2),
        "runs": runs,
        "messages": len(texts),
        "transport": transport,
        "batch": batch,
    }


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
