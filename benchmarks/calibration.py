"""Calibration on the bundled sample: ece and log-loss before and after, and a fitted threshold.

For each seed, a 16-per-class model is trained on the bundled SpamAssassin sample
(``stream_classifier.samples``, train split) from the offline all-MiniLM-L6-v2 with the
``retrain.*`` defaults (20 iterations, 1 epoch, body trained at 64 tokens), as
``stream-classifier train`` does. The eval split (400 texts, never trained on) is cut in two
stratified halves: a *calibration* half and a *test* half. On the test half, at the
serving truncation, it reports accuracy, ``ece`` (15 bins), log-loss and the mean top-label
confidence of:

- ``uncalibrated``: the LogisticRegression head as fitted (temperature 1);
- ``cross-validation``: calibrated out of fold on the 32 training examples alone (what
  ``train`` does without ``--eval-data``);
- ``held-out``: calibrated on the calibration half (what ``train --eval-data`` and the
  retrainer, on its held-out split, do).

and, for ``--target-precision`` on spam fitted on the calibration half, the precision and
the share of spam predictions kept on the test half.

Run it (about 10 CPU-minutes a seed: 35 minutes on the 2 shared cores under a load of 11)::

    nice -n 19 .venv/bin/python benchmarks/calibration.py --seeds 1 2 3 --out bench-results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from stream_classifier.cli import _head_fit  # noqa: E402  (the head fit `train` scores out of fold with)
from stream_classifier.model.calibration import calibrate_from, calibration_scores  # noqa: E402
from stream_classifier.model.examples import Example  # noqa: E402
from stream_classifier.model.head import LinearHead  # noqa: E402
from stream_classifier.model.runtime import ModelRuntime  # noqa: E402
from stream_classifier.model.training import TrainingConfig, train_model  # noqa: E402
from stream_classifier.samples import require_offline_minilm, sample_examples  # noqa: E402


def _per_class(examples: list[Example], n: int, rng: random.Random) -> list[Example]:
    labels = sorted({e.label for e in examples})
    return [e for label in labels for e in rng.sample([x for x in examples if x.label == label], n)]


def _halves(examples: list[Example], rng: random.Random) -> tuple[list[Example], list[Example]]:
    first: list[Example] = []
    second: list[Example] = []
    for label in sorted({e.label for e in examples}):
        rows = [e for e in examples if e.label == label]
        rng.shuffle(rows)
        first += rows[: len(rows) // 2]
        second += rows[len(rows) // 2 :]
    return first, second


def _report(head: LinearHead, embeddings: np.ndarray, truth: list[str]) -> dict[str, float]:
    probabilities = head.predict_proba(embeddings)
    predicted = [head.classes[i] for i in probabilities.argmax(axis=1)]
    return {
        "accuracy": float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])),
        **calibration_scores(head.classes, probabilities, truth),
        "mean_top_confidence": float(probabilities.max(axis=1).mean()),
        "temperature": head.temperature,
    }


def _threshold_outcome(
    head: LinearHead, embeddings: np.ndarray, truth: list[str], label: str
) -> dict[str, Any]:
    probabilities = head.predict_proba(embeddings)
    column = head.classes.index(label)
    predicted = probabilities.argmax(axis=1) == column
    threshold = head.thresholds.get(label)
    kept = predicted & (probabilities[:, column] >= (threshold if threshold is not None else 0.0))
    hits = np.array([t == label for t in truth])
    return {
        "threshold": threshold,
        "precision_without": float(hits[predicted].mean()) if predicted.any() else None,
        "precision_with": float(hits[kept].mean()) if kept.any() else None,
        "kept_share_of_predictions": float(kept.sum() / max(1, predicted.sum())),
    }


def run_seed(seed: int, per_class: int, target: float) -> dict[str, Any]:
    rng = random.Random(seed)
    train = _per_class(sample_examples("train"), per_class, rng)
    calibration_half, test_half = _halves(sample_examples("eval"), rng)
    config = TrainingConfig(
        num_iterations=20, epochs=1, max_seq_length=64, seed=seed, show_progress_bar=False
    )
    bundle = train_model(train, require_offline_minilm("pass a MiniLM"), config, device="cpu")
    runtime = ModelRuntime(bundle, device="cpu", precision="fp32")
    embed = {
        name: runtime.embed([e.text for e in rows])
        for name, rows in (("train", train), ("calibration", calibration_half), ("test", test_half))
    }
    truth = {
        "train": [e.label for e in train],
        "calibration": [e.label for e in calibration_half],
        "test": [e.label for e in test_half],
    }
    plain = bundle.head
    targets = {"spam": target}
    by_cv, cv_summary = calibrate_from(
        plain, embed["train"], truth["train"], targets, fit=_head_fit(config), seed=seed
    )
    held_out, held_summary = calibrate_from(plain, embed["calibration"], truth["calibration"], targets)
    return {
        "seed": seed,
        "test": {
            "uncalibrated": _report(plain, embed["test"], truth["test"]),
            "cross-validation": _report(by_cv, embed["test"], truth["test"]),
            "held-out": _report(held_out, embed["test"], truth["test"]),
        },
        "fits": {"cross-validation": cv_summary, "held-out": held_summary},
        "spam_threshold_on_test": _threshold_outcome(held_out, embed["test"], truth["test"], "spam"),
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--target-precision", type=float, default=0.95, help="for spam")
    parser.add_argument("--out", type=Path, default=Path("bench-results/calibration.json"))
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args.per_class, args.target_precision))
        print(json.dumps(runs[-1]["test"]), flush=True)
    variants = list(runs[0]["test"])
    mean = {
        variant: {
            metric: float(np.mean([r["test"][variant][metric] for r in runs]))
            for metric in ("accuracy", "ece", "log_loss", "mean_top_confidence")
        }
        for variant in variants
    }
    result = {"cpu": _cpu(), "cores": os.cpu_count(), "args": vars(args) | {"out": str(args.out)}}
    result |= {"mean_over_seeds": mean, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(mean, indent=2))


if __name__ == "__main__":
    main()
