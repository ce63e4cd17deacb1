"""Scaling out the Kafka way: N `stream-classifier serve` processes in one consumer group.

One backlog on an input topic with 8 partitions (embedded Tansu broker), then N real
``serve`` processes (``python -m stream_classifier serve``) started together in one group;
the measure is the group's committed offsets, summed over the partitions, read every
0.5 s: the rate between 10 % and 90 % of the backlog committed (so that start-up, the
group join and its rebalances stay outside it). Each run is a fresh topic and group.

The body is random-init (``--arch``: ``tiny`` has next to no compute, so it shows what the
client + service path sustains per process; ``minilm`` / ``mpnet-base`` for a real model's
size), with a head fitted on its embeddings of the bundled sample.

Run (CPU, here)::

    .venv/bin/python benchmarks/workers_scaling.py --arch tiny --processes 1,2 \\
        --transport kafka-python --messages 60000

benchmarks/gpu_check.py runs it on CUDA for the GPU check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package is the repo's
TOKENIZER = REPO / "benchmarks" / "tokenizer"
PARTITIONS = 8


def _committed_rate(samples: list[tuple[float, int]], messages: int) -> float:
    """msg/s between the first samples at >= 10 % and >= 90 % of ``messages`` committed."""
    low = next(((t, c) for t, c in samples if c >= 0.1 * messages), None)
    high = next(((t, c) for t, c in samples if c >= 0.9 * messages), None)
    if low is None or high is None or high[0] <= low[0]:
        return 0.0
    return (high[1] - low[1]) / (high[0] - low[0])


def workers_scaling(
    log: Path,
    *,
    arch: str,
    device: str,
    precision: str,
    processes: int,
    messages: int,
    box_s: float,
    transport: str = "kafka-python",
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """``processes`` `serve` processes in one group over a backlog of ``messages``."""
    import yaml
    from kafka import KafkaConsumer, TopicPartition

    from stream_classifier.bench import bench_texts, produce_backlog
    from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics
    from stream_classifier.model.format import save_model
    from stream_classifier.model.training import TrainingConfig, train_model
    from stream_classifier.samples import build_random_body, sample_examples

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker, log.open("a") as sink:
        body = build_random_body(arch, TOKENIZER, Path(tmp) / "body")
        config = TrainingConfig(head_only=True, show_progress_bar=False)
        bundle = train_model(sample_examples("train"), str(body), config, device=device)
        model = save_model(bundle, Path(tmp) / "model")
        bootstrap = broker.bootstrap_servers
        tag = uuid.uuid4().hex[:6]
        source, group = f"w-in-{tag}", f"w-{tag}"
        create_topics(bootstrap, [source], partitions=PARTITIONS)
        create_topics(bootstrap, [f"w-out-{tag}", f"w-dlq-{tag}"])
        produce_backlog(
            bootstrap,
            source,
            (json.dumps({"text": t, "id": str(i)}).encode() for i, t in enumerate(bench_texts(messages, 20))),
        )
        settings = Path(tmp) / "serve.yaml"
        settings.write_text(
            yaml.safe_dump(
                {
                    "kafka": {
                        "bootstrap_servers": bootstrap,
                        "group_id": group,
                        "input_topics": source,
                        "output_topic": f"w-out-{tag}",
                        "dead_letter_topic": f"w-dlq-{tag}",
                        "transport": transport,
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 1000,
                        "max_poll_records": 2000,
                    },
                    "model": {"path": str(model), "device": device, "precision": precision},
                    "batching": {"max_batch_size": 256, "max_wait_ms": 5, "max_in_flight": 8192},
                    "processing": {"commit_interval_ms": 200},
                    "metrics": {"port": 0},
                    "logging": {"level": "WARNING"},
                }
            )
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        if torch_threads is not None:
            env["OMP_NUM_THREADS"] = str(torch_threads)
        servers = [
            subprocess.Popen(
                [sys.executable, "-m", "stream_classifier", "serve", "--config", str(settings)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            for _ in range(processes)
        ]
        watcher = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        partitions = [TopicPartition(source, p) for p in range(PARTITIONS)]
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + box_s
        try:
            while time.monotonic() < deadline:
                committed = sum(watcher.committed(tp) or 0 for tp in partitions)
                samples.append((time.monotonic(), committed))
                if committed >= messages:
                    break
                time.sleep(0.5)
        finally:
            watcher.close()
            for server in servers:
                server.send_signal(signal.SIGTERM)
            for server in servers:
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
    committed = samples[-1][1] if samples else 0
    return {
        "processes": processes,
        "transport": transport,
        "arch": arch,
        "torch_threads": torch_threads,
        "messages": messages,
        "committed": committed,
        "msg_per_s": round(_committed_rate(samples, messages), 1),
        "note": "aggregate committed msg/s between 10 % and 90 % of the backlog; 8 partitions",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny", choices=["tiny", "minilm", "mpnet-base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--transport", default="kafka-python")
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--box-s", type=float, default=300.0, help="time limit per run")
    parser.add_argument(
        "--torch-threads-total",
        type=int,
        default=None,
        help="OMP_NUM_THREADS = this // processes in each process (default: torch's own)",
    )
    parser.add_argument("--log", type=Path, default=Path("bench-results/workers.log"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(p) for p in args.processes.split(",")):
        threads = max(1, args.torch_threads_total // n) if args.torch_threads_total else None
        value = workers_scaling(
            args.log,
            arch=args.arch,
            device=args.device,
            precision=args.precision,
            processes=n,
            messages=args.messages,
            box_s=args.box_s,
            transport=args.transport,
            torch_threads=threads,
        )
        results.append(value)
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
