"""The bench's pipeline and latency stages on Tansu and on Apache Kafka, in one run.

For each broker: the pipeline stage (the real service draining a backlog over 4 partitions,
at-least-once) gives the peak; the latency stage then paces a producer at half that peak and
reads each output's broker timestamp against its send time (p50, p99). Same model, texts,
batch and client (kafka-python) on both brokers; the brokers run one after the other, each
alone. Apache Kafka 4.4.0 comes from the test suite's jars (``bash .ci/setup-tests``) and its
fixture (tests/fixtures/kafka_broker.py); Tansu is the embedded broker.

Run (11 minutes on the shared 2-core VM; the pipeline stages stop at 120 s each)::

    nice -n 19 .venv/bin/python benchmarks/latency_both_brokers.py --output bench-results/latency-both.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_classifier.bench import BenchOptions, run_bench  # noqa: E402
from stream_classifier.demo.embedded_broker import EmbeddedBroker  # noqa: E402
from tests.fixtures.kafka_broker import KafkaBroker, jar_cache, unavailable_reason  # noqa: E402


@contextlib.contextmanager
def started(kind: str) -> Iterator[str]:
    if kind == "tansu":
        with EmbeddedBroker() as tansu:
            yield tansu.bootstrap_servers
        return
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"Apache Kafka cannot start here: {reason}")
    with KafkaBroker(jar_cache()) as kafka:
        yield kafka.plaintext


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-results/latency-both.json"))
    parser.add_argument("--messages", type=int, default=2_000, help="through each pipeline stage")
    parser.add_argument("--transport", default="kafka-python")
    args = parser.parse_args()
    found: dict[str, Any] = {}
    for kind in ("tansu", "apache-kafka"):
        with started(kind) as bootstrap:
            options = BenchOptions(
                output=args.output,
                quick=True,
                device="cpu",
                precision="fp32",
                transports=(args.transport,),
                bootstrap_servers=bootstrap,
                messages=args.messages,
                batch_sizes=(64,),
                stages=("pipeline", "latency"),
            )
            results = run_bench(options, sys.stderr)
            found[kind] = {"meta": results.meta, "stages": results.stages}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(found, indent=2))
    print("| broker | pipeline msg/s | latency at msg/s | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for kind, result in found.items():
        stages = result["stages"]
        pipeline = next(v for k, v in stages.items() if k.startswith("pipeline"))
        latency = stages["latency"]
        print(
            f"| {kind} | {pipeline.get('msg_per_s')} | {latency['achieved_msg_per_s']} "
            f"| {latency['p50_ms']} | {latency['p99_ms']} | {latency['max_ms']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
