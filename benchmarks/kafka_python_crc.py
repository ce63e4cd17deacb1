"""kafka-python's record-batch checksums: the ``crc32c`` package (extra ``[fast]``) or not.

kafka-python computes a CRC-32C over every record batch it produces and, with
``check_crcs`` (default on), every batch it fetches. It uses the ``crc32c`` package (C)
when importable, else its own pure-Python code. This script measures producing and
consuming ~100-byte messages against the embedded broker with each, in alternating child
processes (the "python" child blocks ``import crc32c``), so that the ratios come from one
run.

Run (~1 minute; needs the ``[fast]`` extra for the C side)::

    .venv/bin/python benchmarks/kafka_python_crc.py [--messages 50000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A child that blocks `import crc32c` does so before it imports this module (and kafka).
from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics  # noqa: E402
from stream_classifier.transport.kafka_python import crc32c_implementation  # noqa: E402

VALUE = json.dumps({"text": "x" * 80, "id": "m"}).encode()


def measure(bootstrap: str, messages: int) -> dict[str, float | str]:
    """Produce then consume ``messages`` on a fresh topic; msg/s of each (in this process)."""
    topic = f"crc-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic], partitions=1)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    started = time.perf_counter()
    for _ in range(messages):
        producer.send(topic, value=VALUE)
    producer.flush()
    produce = messages / (time.perf_counter() - started)
    producer.close()
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    got, first = 0, None
    while got < messages:
        for records in consumer.poll(timeout_ms=500, max_records=5_000).values():
            first = first or time.perf_counter()
            got += len(records)
    consume = messages / (time.perf_counter() - (first or time.perf_counter()))
    consumer.close()
    return {"crc32c": crc32c_implementation(), "produce_msg_s": produce, "consume_msg_s": consume}


def child(bootstrap: str, messages: int, block_c: bool) -> dict[str, float | str]:
    paths = [str(REPO), str(REPO / "benchmarks")]
    code = (
        ("import sys; sys.modules['crc32c'] = None\n" if block_c else "")
        + f"import json, sys; sys.path[:0] = {paths!r}\n"
        + f"from kafka_python_crc import measure; print(json.dumps(measure({bootstrap!r}, {messages})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result: dict[str, float | str] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float | str]]] = {"c": [], "python": []}
    with EmbeddedBroker() as broker:
        for _ in range(args.rounds):
            for side in ("c", "python"):
                result = child(broker.bootstrap_servers, args.messages, block_c=side == "python")
                if result["crc32c"] != side:
                    raise SystemExit(f"asked for {side}, the child used {result['crc32c']}: install [fast]")
                runs[side].append(result)
                print(json.dumps(result), flush=True)
    for metric in ("produce_msg_s", "consume_msg_s"):
        c = statistics.median(float(r[metric]) for r in runs["c"])
        py = statistics.median(float(r[metric]) for r in runs["python"])
        print(f"{metric}: c {c:,.0f}, python {py:,.0f}, c/python {c / py:.2f}")


if __name__ == "__main__":
    main()
