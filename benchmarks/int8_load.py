"""int8 mode's load and hot-swap time: the stored int8 body against the export at every load.

Two copies of one model directory: one saved with its int8 body (``int8/``, as
``save_model(int8=True)`` and an int8 model store make it), one without (every load exports
and quantises the body, as int8 mode did before). Interleaved rounds time, for each:

- **load**: ``ModelRuntime.load(DIR, device="cpu", quantize="int8")``;
- **swap**: what a replica does for a hot swap (``learn.updates.load_runtime``: load, then
  warm up, on a passing thread).

It also times the one-off build (``ensure_artifact``) that the stored copy paid once. The
figures are medians of the rounds, with the ratio from the same run. Run it at low priority
on a shared machine (~3 minutes on 2 cores for MiniLM)::

    nice -n 19 .venv/bin/python benchmarks/int8_load.py [--model DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from stream_classifier.config import Settings  # noqa: E402
from stream_classifier.learn.updates import load_runtime  # noqa: E402
from stream_classifier.model.format import save_model  # noqa: E402
from stream_classifier.model.int8 import ARTIFACT_DIR, ensure_artifact  # noqa: E402
from stream_classifier.model.precision import REPORTED_FLAGS, read_cpu_flags  # noqa: E402
from stream_classifier.model.runtime import ModelRuntime  # noqa: E402
from stream_classifier.model.training import TrainingConfig, train_model  # noqa: E402
from stream_classifier.samples import require_offline_minilm, sample_examples  # noqa: E402


def seconds(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def cpu_name() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="a model directory (default: MiniLM + a head on the sample)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = Settings.model_validate({"model": {"device": "cpu", "quantize": "int8"}})
    with tempfile.TemporaryDirectory(prefix="int8-load-") as tmp:
        plain = Path(tmp) / "plain"
        if args.model is not None:
            shutil.copytree(args.model, plain)
            shutil.rmtree(plain / ARTIFACT_DIR, ignore_errors=True)
        else:
            config = TrainingConfig(head_only=True, show_progress_bar=False)
            bundle = train_model(
                sample_examples("train"), require_offline_minilm("pass --model DIR"), config, device="cpu"
            )
            save_model(bundle, plain)
        stored = Path(tmp) / "stored"
        shutil.copytree(plain, stored)
        build_s = seconds(lambda: ensure_artifact(stored))
        timings: dict[str, list[float]] = {
            f"{kind}_{copy}": [] for kind in ("load", "swap") for copy in ("export", "stored")
        }
        for _ in range(args.rounds):
            for copy, path in (("export", plain), ("stored", stored)):
                timings[f"load_{copy}"].append(
                    seconds(lambda p=path: ModelRuntime.load(p, device="cpu", quantize="int8"))
                )
                timings[f"swap_{copy}"].append(seconds(lambda p=path: load_runtime(settings, p)))
    medians = {name: round(statistics.median(values), 3) for name, values in timings.items()}
    report = {
        "command": " ".join(["benchmarks/int8_load.py", *sys.argv[1:]]),
        "cpu": cpu_name(),
        "cpu_features": sorted(set(REPORTED_FLAGS) & read_cpu_flags()),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "build_once_s": round(build_s, 3),
        "median_s": medians,
        "rounds_s": {name: [round(v, 3) for v in values] for name, values in timings.items()},
        "load_export/stored": round(medians["load_export"] / medians["load_stored"], 2),
        "swap_export/stored": round(medians["swap_export"] / medians["swap_stored"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
