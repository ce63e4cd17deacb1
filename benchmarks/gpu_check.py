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
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the package is the repo's
TOKENIZER = REPO / "benchmarks" / "tokenizer"

from workers_scaling import workers_scaling  # noqa: E402 - benchmarks/, next to this script


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
                args.out / "workers.log",
                arch="minilm",
                device="cpu" if dry else "cuda",
                precision="fp32" if dry else "fp16",
                processes=2,
                messages=300 if dry else 60_000,
                box_s=box,
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
