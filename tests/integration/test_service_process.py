"""`stream-classifier serve` as a process: SIGKILL mid-stream loses nothing; SIGTERM is graceful.

Subprocesses are the point here (a real crash and a real signal); other tests run the
service in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaProducer

from tests.fixtures.broker import (
    TEST_HEARTBEAT_MS,
    TEST_SESSION_TIMEOUT_MS,
    TRANSPORTS,
    committed_offsets,
    produce,
    transport_properties,
)
from tests.integration.service_support import TopicReader, output_body

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("transport", TRANSPORTS)]


def write_config(
    path: Path,
    broker: str,
    *,
    group: str,
    source: str,
    out: str,
    dlq: str,
    model: Path,
    transport: str = "kafka-python",
) -> Path:
    config = {
        "kafka": {
            "transport": transport,
            **transport_properties(transport),
            "bootstrap_servers": broker,
            "group_id": group,
            "input_topics": source,
            "output_topic": out,
            "dead_letter_topic": dlq,
            "session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": TEST_HEARTBEAT_MS,
        },
        "model": {"path": str(model), "device": "cpu", "precision": "fp32"},
        "batching": {"max_batch_size": 4, "max_wait_ms": 10},
        "processing": {"shutdown_timeout_s": 20},
        "metrics": {"port": 0},  # an ephemeral port: tests run side by side
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("STREAM_CLASSIFIER_")}
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_classifier", "serve", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )


def message(i: int) -> bytes:
    return json.dumps({"text": f"message number {i} about the weather", "id": f"m{i}"}).encode()


def ids(records: list[Any]) -> set[str]:
    return {output_body(r)["id"] for r in records}


def test_sigkill_mid_stream_then_restart_loses_nothing(
    broker: str, topic_factory, tiny_model_dir: Path, tmp_path: Path, transport: str
) -> None:
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    group = f"crash-{source}"
    config = write_config(
        tmp_path / "c.yaml",
        broker,
        group=group,
        source=source,
        out=out,
        dlq=dlq,
        model=tiny_model_dir,
        transport=transport,
    )
    n, head = 300, 20
    produce(broker, source, [(None, message(i)) for i in range(head)])
    reader = TopicReader(broker, out)
    first = start_serve(config, tmp_path / "first.log")
    try:
        reader.wait_for(lambda records: len(records) >= 1, 120, "the first output")

        def trickle() -> None:  # input keeps arriving while the process dies
            producer = KafkaProducer(bootstrap_servers=broker)
            for i in range(head, n):
                producer.send(source, value=message(i))
                time.sleep(0.01)
            producer.flush()
            producer.close()

        feeder = threading.Thread(target=trickle)
        feeder.start()
        time.sleep(1.0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        feeder.join(timeout=60)
        done_before_restart = ids(reader.read(1.0))
        assert len(done_before_restart) < n, "the kill came too late to test anything"
    finally:
        if first.poll() is None:
            first.kill()

    second = start_serve(config, tmp_path / "second.log")
    try:
        reader.wait_for(lambda records: ids(records) == {f"m{i}" for i in range(n)}, 180, "every message")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=40) == 0
    finally:
        if second.poll() is None:
            second.kill()
        reader.close()
    assert sum(offset or 0 for offset in committed_offsets(broker, group, source).values()) == n


def test_sigterm_finishes_flushes_commits_and_exits_zero(
    broker: str, topic_factory, tiny_model_dir: Path, tmp_path: Path, transport: str
) -> None:
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    group = f"term-{source}"
    config = write_config(
        tmp_path / "c.yaml",
        broker,
        group=group,
        source=source,
        out=out,
        dlq=dlq,
        model=tiny_model_dir,
        transport=transport,
    )
    produce(broker, source, [(None, message(i)) for i in range(200)])
    reader = TopicReader(broker, out)
    log = tmp_path / "serve.log"
    process = start_serve(config, log)
    try:
        reader.wait_for(lambda records: len(records) >= 1, 120, "the first output")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=40) == 0
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
    commits = committed_offsets(broker, group, source)
    outputs = reader.wait_for(lambda records: len(records) >= sum(c or 0 for c in commits.values()), 30)
    time.sleep(0.5)
    outputs = reader.read(0.5)
    reader.close()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    stopped = [e for e in events if e["event"] == "service_stopped"]
    assert stopped and stopped[-1]["uncommitted"] == 0
    assert sum(c or 0 for c in commits.values()) > 0
    for partition, committed in commits.items():
        sources = [output_body(r)["source"] for r in outputs]
        published = sorted(s["offset"] for s in sources if s["partition"] == partition)
        # Everything published was committed, and nothing was committed before it was published.
        assert (committed or 0) == (published[-1] + 1 if published else 0)
        assert published == list(range(len(published)))
