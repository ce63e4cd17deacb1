"""Latency against the embedded broker, by the consumer's ``fetch_max_wait_ms``.

The bench's latency stage at half load gave p50 ~300 ms on 2 CPU cores, far above a batch's
compute time. This script reruns that stage (same model, texts and settings) with the
kafka-python consumer's ``fetch_max_wait_ms`` at its default (500), 100 and 20, passed as
``kafka.consumer_properties`` exactly as a user would, at a rate given on the command line.
A broker answers a fetch as soon as ``fetch_min_bytes`` (1) are there; if latency follows
``fetch_max_wait_ms``, the broker holds fetches instead.

Run (~2 minutes; machine otherwise quiet)::

    .venv/bin/python benchmarks/fetch_wait_latency.py --rate 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_classifier.bench import broker_stages, stages  # noqa: E402
from stream_classifier.bench.options import BenchOptions  # noqa: E402
from stream_classifier.demo.embedded_broker import EmbeddedBroker  # noqa: E402
from stream_classifier.model.runtime import ModelRuntime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=5.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    model_dir, _ = stages.prepare_model(BenchOptions(output=work / "unused.json", device="cpu"), work)
    runtime = ModelRuntime.load(model_dir, device="cpu", precision="fp32")
    runtime.warmup()
    texts = stages.bench_texts(2_000, 24)
    make_settings = broker_stages._service_settings
    with EmbeddedBroker() as broker:
        for wait_ms in (None, 100, 20):

            def settings(*a: Any, wait_ms: int | None = wait_ms, **k: Any) -> Any:
                result = make_settings(*a, **k)
                if wait_ms is not None:
                    result.kafka.consumer_properties = {"fetch_max_wait_ms": wait_ms}
                return result

            with mock.patch.object(broker_stages, "_service_settings", settings):
                result = broker_stages.stage_latency(
                    broker.bootstrap_servers,
                    runtime,
                    texts,
                    transport="kafka-python",
                    batch=64,
                    rate=args.rate,
                    seconds=args.seconds,
                )
            print(json.dumps({"fetch_max_wait_ms": wait_ms or "default (500)", **result}), flush=True)


if __name__ == "__main__":
    main()
