"""One time-boxed GPU check: GPU tests, then `stream-classifier bench` on CUDA.

Run by benchmarks/gpu_check.sh (which installs the carried wheels first). Every stage is a
subprocess with its own time box, cut further to what is left of ``--budget``; a stage that
runs over is killed and recorded as such, and the next one starts. Progress goes to stdout;
results go to ``--out`` (at most 8 files):

    summary.json        every stage's status, seconds and (for the benches) results
    env.log             nvidia-smi, versions, the wheel install
    pytest_gpu.log      pytest -m gpu
    bench_mpnet.json    mpnet-base-sized random-init body: fp32/fp16/bf16 bare throughput
    bench_minilm.json   MiniLM-L6-sized body: bare, precisions, pipeline x 2 transports, naive, latency
    bench_mpnet.log, bench_minilm.log   their output
    workers.log         several `serve` processes in one group (scaling of the kafka-python path)

``--dry-run`` runs the same stages on the CPU with tiny sizes, to check the script itself.
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


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def say(message: str) -> None:
    sys.stdout.write(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


def run_stage(name: str, argv: list[str], log: Path, box_s: float, budget: Budget) -> dict[str, Any]:
    """Run ``argv`` with its output appended to ``log``, killed after min(box, budget left - 10 s)."""
    limit = min(box_s, budget.left() - 10)
    if limit < 15:
        say(f"{name}: skipped, {budget.left():.0f} s left")
        return {"status": "skipped", "reason": "out of time"}
    say(f"{name}: starting (time box {limit:.0f} s)")
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "timed out"
    seconds = round(time.monotonic() - started, 1)
    say(f"{name}: {status} after {seconds} s")
    return {"status": status, "seconds": seconds}


def bench_argv(
    out_json: Path, *, arch: str, dry_run: bool, stages: str, precisions: str, messages: int
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "stream_classifier",
        "bench",
        "--random-arch",
        arch,
        "--tokenizer",
        str(TOKENIZER),
        "--device",
        "cpu" if dry_run else "cuda",
        "--precision",
        "fp32" if dry_run else "fp16",
        "--precisions",
        precisions,
        "--stages",
        stages,
        "--messages",
        str(messages),
        "--words",
        "20",
        "--stage-timeout",
        "40" if not dry_run else "60",
        "--quick",
        "--output",
        str(out_json),
    ]
    if dry_run:
        argv += ["--batch-sizes", "8,32"]
    return argv


def workers_scaling(
    out: Path, *, dry_run: bool, processes: int, messages: int, box_s: float
) -> dict[str, Any]:
    """``processes`` `serve` processes (kafka-python) in one group over a backlog: aggregate msg/s."""
    import yaml
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from stream_classifier.bench import bench_texts, build_random_body
    from stream_classifier.demo import sample_examples
    from stream_classifier.model.format import save_model
    from stream_classifier.model.training import TrainingConfig, train_model
    from stream_classifier.stream.embedded_broker import EmbeddedBroker, create_topics

    device = "cpu" if dry_run else "cuda"
    log = out / "workers.log"
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker, log.open("a") as sink:
        body = build_random_body("minilm", TOKENIZER, Path(tmp) / "body")
        bundle = train_model(
            sample_examples("train"), str(body), TrainingConfig(head_only=True), device=device
        )
        model = save_model(bundle, Path(tmp) / "model")
        bootstrap = broker.bootstrap_servers
        tag = uuid.uuid4().hex[:6]
        source, group = f"w-in-{tag}", f"w-{tag}"
        create_topics(bootstrap, [source], partitions=8)
        create_topics(bootstrap, [f"w-out-{tag}", f"w-dlq-{tag}"])
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
        for i, text in enumerate(bench_texts(messages, 20)):
            producer.send(source, json.dumps({"text": text, "id": str(i)}).encode())
        producer.flush()
        producer.close()
        config = Path(tmp) / "serve.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "kafka": {
                        "bootstrap_servers": bootstrap,
                        "group_id": group,
                        "input_topics": source,
                        "output_topic": f"w-out-{tag}",
                        "dead_letter_topic": f"w-dlq-{tag}",
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 1000,
                        "max_poll_records": 2000,
                    },
                    "model": {
                        "path": str(model),
                        "device": device,
                        "precision": "fp32" if dry_run else "fp16",
                    },
                    "batching": {"max_batch_size": 256, "max_wait_ms": 5, "max_in_flight": 8192},
                    "processing": {"commit_interval_ms": 200},
                    "metrics": {"port": 0},
                    "logging": {"level": "WARNING"},
                }
            )
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        servers = [
            subprocess.Popen(
                [sys.executable, "-m", "stream_classifier", "serve", "--config", str(config)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            for _ in range(processes)
        ]
        watcher = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        partitions = [TopicPartition(source, p) for p in range(8)]
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
    moving = [(t, c) for t, c in samples if c > 0]
    if len(moving) < 2:
        return {"processes": processes, "msg_per_s": 0.0, "note": "no progress measured"}
    (t0, c0), (t1, c1) = moving[0], moving[-1]
    return {
        "processes": processes,
        "messages": messages,
        "committed": c1,
        "msg_per_s": round((c1 - c0) / (t1 - t0), 1) if t1 > t0 else 0.0,
        "note": "aggregate committed msg/s, from the first commit on; each process owns some of 8 partitions",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all stages together")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    dry = args.dry_run
    summary: dict[str, Any] = {"dry_run": dry, "stages": {}}

    def record(name: str, value: dict[str, Any]) -> None:
        summary["stages"][name] = value
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    record(
        "pytest_gpu",
        run_stage(
            "pytest -m gpu",
            [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            args.out / "pytest_gpu.log",
            90,
            budget,
        ),
    )
    for arch, stages, precisions, box, messages in (
        ("mpnet-base", "bare,precision", "fp32,fp16,bf16", 80, 2_000),
        ("minilm", "bare,precision,pipeline,naive,latency", "fp32,fp16,bf16", 170, 60_000),
    ):
        name = f"bench_{arch.split('-')[0]}"
        out_json = args.out / f"{name}.json"
        result = run_stage(
            name,
            bench_argv(
                out_json,
                arch="minilm" if dry else arch,  # the dry run checks the script, not the model
                dry_run=dry,
                stages=stages,
                precisions=precisions if not dry else "fp32",
                messages=messages if not dry else 300,
            ),
            args.out / f"{name}.log",
            box if not dry else 240,
            budget,
        )
        if out_json.exists():
            result["results"] = json.loads(out_json.read_text())
        record(name, result)
    box = min(60.0, budget.left() - 15)
    if box >= 20:
        say(f"workers: 2 serve processes, time box {box:.0f} s")
        started = time.monotonic()
        try:
            value = workers_scaling(
                args.out, dry_run=dry, processes=2, messages=300 if dry else 60_000, box_s=box
            )
        except Exception as exc:
            value = {"status": f"failed: {type(exc).__name__}: {exc}"}
        value["seconds"] = round(time.monotonic() - started, 1)
        say(f"workers: {json.dumps(value)}")
        record("workers", value)
    else:
        record("workers", {"status": "skipped", "reason": "out of time"})
    say(f"done; {budget.left():.0f} s of the budget left; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
