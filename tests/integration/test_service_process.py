"""`stream-classifier serve` as a process: SIGKILL mid-stream loses nothing; SIGTERM is graceful.

Subprocesses are the point here (a real crash and a real signal); other tests run the
service in-process.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from tests.fixtures.broker import TRANSPORTS, TopicFactory, committed_offsets, produce
from tests.integration.service_support import (
    ServeTopics,
    TopicReader,
    crash,
    output_body,
    serve_topics,
    serving,
    terminate,
    write_serve_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("transport", TRANSPORTS)]


def message(i: int) -> bytes:
    return json.dumps({"text": f"message number {i} about the weather", "id": f"m{i}"}).encode()


def ids(records: list[Any]) -> set[str]:
    return {output_body(r)["id"] for r in records}


def serve_setup(
    broker: str,
    topic_factory: TopicFactory,
    model: Path,
    tmp_path: Path,
    *,
    transport: str,
    group_prefix: str,
) -> tuple[ServeTopics, str, Path]:
    """Two-partition topics, a group and a `serve` config (small batches) for one test."""
    topics = serve_topics(topic_factory, partitions=2)
    group = f"{group_prefix}-{topics.source}"
    config = write_serve_config(
        tmp_path / "c.yaml",
        broker=broker,
        group=group,
        topics=topics,
        model=model,
        transport=transport,
        batching={"max_batch_size": 4},
    )
    return topics, group, config


def test_sigkill_mid_stream_then_restart_loses_nothing(
    broker: str, topic_factory, tiny_model_dir: Path, tmp_path: Path, transport: str
) -> None:
    (source, out, _dlq), group, config = serve_setup(
        broker, topic_factory, tiny_model_dir, tmp_path, transport=transport, group_prefix="crash"
    )
    n, head = 300, 20
    produce(broker, source, [(None, message(i)) for i in range(head)])
    reader = TopicReader(broker, out)
    with serving(config, tmp_path / "first.log") as first:
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
        crash(first)
        feeder.join(timeout=60)
        done_before_restart = ids(reader.read(1.0))
        assert len(done_before_restart) < n, "the kill came too late to test anything"

    try:
        with serving(config, tmp_path / "second.log") as second:
            reader.wait_for(lambda records: ids(records) == {f"m{i}" for i in range(n)}, 180, "every message")
            assert terminate(second) == 0
    finally:
        reader.close()
    assert sum(offset or 0 for offset in committed_offsets(broker, group, source).values()) == n


def test_sigterm_finishes_flushes_commits_and_exits_zero(
    broker: str, topic_factory, tiny_model_dir: Path, tmp_path: Path, transport: str
) -> None:
    (source, out, _dlq), group, config = serve_setup(
        broker, topic_factory, tiny_model_dir, tmp_path, transport=transport, group_prefix="term"
    )
    produce(broker, source, [(None, message(i)) for i in range(200)])
    reader = TopicReader(broker, out)
    log = tmp_path / "serve.log"
    with serving(config, log) as process:
        reader.wait_for(lambda records: len(records) >= 1, 120, "the first output")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=40) == 0
        assert time.monotonic() - started < 30
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
