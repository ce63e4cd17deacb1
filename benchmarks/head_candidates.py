"""Head-level candidates of issue #15 on a development split: which are worth a full run?

For each corpus, one seed trains the default recipe's body (plain SetFit, the benchmark's
hyperparameters: ``setfit_parity.HYPERPARAMETERS``) on ``per_class`` examples per label from
``train.jsonl``, then every candidate is scored on a **development split drawn from the rest
of train.jsonl** (never the test texts, so choosing among candidates here does not tune on
the verdict of ``benchmarks/accuracy.py``). The dev split follows the corpus's test split
(balanced, or in the labels' frequencies; ``manifest.json``); another ``--pool`` texts of
the rest, labels dropped, stand for the unlabelled stream.

Candidates (all on the same fine-tuned body and examples; ``--recipe`` and
``--body-learning-rate`` train that body another way, to compare bodies by their ``lr``):

- ``lr``: setfit's head, ``LogisticRegression()`` on the embeddings (the reference);
- ``centroid``: the nearest-centroid blend (``model/geometry.py``, weight 0.5);
- ``names λ``: the label-name prior, logits + λ · cos(x, name_k) (names cleaned as in
  ``model/anchors.py``, embedded by the fine-tuned body); ``names gated`` applies λ = 2
  only where the base body's zero-shot accuracy on the training texts passes the anchors'
  gate (``anchors.zero_shot_gate``); ``names cv tuned`` and ``names cv base`` choose λ in
  ``(0, *NAME_WEIGHTS)`` by stratified ``CV_FOLDS``-fold cross-validation on the training
  examples alone (the λ with the most held-out examples right, ties to the smaller), on the
  fine-tuned body's embeddings or on the base body's, then apply it to the fine-tuned head;
- ``em T``: prior correction by EM (Saerens et al. 2002) on the unlabelled dev texts'
  posteriors at temperature T (training priors uniform, as the draw is balanced);
- ``self``: self-training, the head refit on the training examples plus the most confident
  pseudo-labelled pool texts (class-balanced, up to 50 per class);
- ``wise α``: WiSE-FT, the head fitted on a body interpolated α·fine-tuned + (1-α)·base.

Run (about 16 minutes per seed for the six corpora on 2 CPU cores)::

    nice -n 19 .venv/bin/python benchmarks/head_candidates.py --seed 100 \\
        --out bench-results/head-candidates.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from accuracy import DATASETS, DEFAULT_CORPORA, _default_base  # noqa: E402
from setfit_parity import HYPERPARAMETERS, _balanced_subset, _machine, _read_jsonl  # noqa: E402

NAME_WEIGHTS = (0.5, 1.0, 2.0, 4.0)
GATED_NAME_WEIGHT = 2.0
EM_TEMPERATURES = (1.0, 0.5, 0.25)
WISE_ALPHAS = (0.3, 0.5, 0.7)
CV_FOLDS = 4
SELF_TRAINING_PER_CLASS = 50
DEV_TEXTS = 400


def _logits(model: Any, x: NDArray[Any]) -> NDArray[np.float64]:
    z = np.asarray(model.decision_function(x), dtype=np.float64)
    return np.stack([np.zeros_like(z), z], axis=1) if z.ndim == 1 else z


def _softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _lr(x: NDArray[Any], y: NDArray[Any]) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000, random_state=0).fit(x, y)


def cv_name_weight(x: NDArray[Any], y: NDArray[Any], names: NDArray[Any], labels: list[str]) -> float:
    """The label-name weight in ``(0, *NAME_WEIGHTS)`` that gets the most training examples
    right when each fold is held out of a logistic head fitted on the rest; ties go to the
    smaller weight, so the prior must earn its place."""
    from sklearn.model_selection import StratifiedKFold

    classes = np.asarray(labels)
    weights = (0.0, *NAME_WEIGHTS)
    right = np.zeros(len(weights))
    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=0)
    for fit, held in folds.split(x, y):
        z = _logits(_lr(x[fit], y[fit]), x[held])
        for i, weight in enumerate(weights):
            right[i] += np.sum(classes[np.argmax(z + weight * (x[held] @ names.T), axis=1)] == y[held])
    return weights[int(np.argmax(right))]  # argmax takes the first (smallest) of equals


def em_priors(posteriors: NDArray[np.float64], iterations: int = 100) -> NDArray[np.float64]:
    """The class priors of the texts behind ``posteriors`` (computed under uniform priors), by EM."""
    k = posteriors.shape[1]
    prior = np.full(k, 1.0 / k)
    for _ in range(iterations):
        adjusted = posteriors * prior * k
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        new = adjusted.mean(axis=0)
        if np.abs(new - prior).max() < 1e-6:
            return new
        prior = new
    return prior


def _dev_split(
    corpus: str, rows: list[dict[str, str]], train: list[dict[str, str]], seed: int, pool: int
) -> Any:
    manifest = json.loads((HERE / "datasets" / "manifest.json").read_text(encoding="utf-8"))
    chosen = {r["text"] for r in train}
    rest = [r for r in rows if r["text"] not in chosen]
    random.Random(seed + 7).shuffle(rest)
    labels = sorted({r["label"] for r in rows})
    if manifest[corpus]["test_split"] == "balanced":
        per = DEV_TEXTS // len(labels) + 1
        dev = [r for label in labels for r in [r for r in rest if r["label"] == label][:per]]
    else:
        dev = rest[:DEV_TEXTS]
    taken = {r["text"] for r in dev}
    return labels, dev, [r for r in rest if r["text"] not in taken][:pool]


def probe(corpus: str, base: Any, args: argparse.Namespace) -> dict[str, Any]:
    from stream_classifier.model.anchors import clean_label, zero_shot_gate
    from stream_classifier.model.examples import Example
    from stream_classifier.model.geometry import centroid_scores
    from stream_classifier.model.training import TrainingConfig, encode, train_model

    seed, per_class, pool_size = args.seed, args.per_class, args.pool
    recipe, learning_rate = args.recipe, args.body_learning_rate

    rows = _read_jsonl(DATASETS / corpus / "train.jsonl")
    train = _balanced_subset(rows, per_class, seed)
    labels, dev, pool = _dev_split(corpus, rows, train, seed, pool_size)
    hp = HYPERPARAMETERS
    config = TrainingConfig(
        recipe=recipe,
        batch_size=hp["batch_size"],
        epochs=hp["epochs"],
        num_iterations=hp["num_iterations"],
        body_learning_rate=learning_rate,
        warmup_proportion=hp["warmup_proportion"],
        max_seq_length=hp["max_seq_length"],
        sampling_strategy=hp["sampling_strategy"],
        seed=seed,
        show_progress_bar=False,
    )
    examples = [Example(r["text"], r["label"]) for r in train]
    gate = zero_shot_gate(base, examples)
    started = time.perf_counter()
    body = train_model(examples, base, config, device="cpu").body
    train_seconds = time.perf_counter() - started
    body.max_seq_length = hp["max_seq_length"]

    def embed(texts: list[str], model: Any = body) -> NDArray[Any]:
        return encode(model, texts, normalize=False, batch_size=64)

    classes = np.asarray(labels)
    xtr, ytr = embed([r["text"] for r in train]), np.asarray([r["label"] for r in train])
    xdev, ydev = embed([r["text"] for r in dev]), np.asarray([r["label"] for r in dev])
    xpool = embed([r["text"] for r in pool]) if pool else xdev  # no pool left: the dev texts, unlabelled

    def name_vectors(model: Any = body) -> NDArray[Any]:
        """The cleaned label names' unit embeddings by ``model``, one row per label."""
        v = embed([clean_label(label) for label in labels], model)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    names = name_vectors()

    def accuracy(z: NDArray[Any]) -> float:
        return float(np.mean(classes[np.argmax(z, axis=1)] == ydev))

    head = _lr(xtr, ytr)
    z = _logits(head, xdev)
    scores: dict[str, float] = {"lr": accuracy(z)}
    coef, intercept = centroid_scores(xtr, ytr, labels, 0.1)
    scores["centroid"] = accuracy(0.5 * z + 0.5 * (xdev @ coef.T + intercept))
    for weight in NAME_WEIGHTS:
        scores[f"names {weight:g}"] = accuracy(z + weight * (xdev @ names.T))
    scores["names gated"] = accuracy(z + (GATED_NAME_WEIGHT if gate.use else 0.0) * (xdev @ names.T))
    base_train = embed([r["text"] for r in train], base)
    chosen = {
        "tuned": cv_name_weight(xtr, ytr, names, labels),
        "base": cv_name_weight(base_train, ytr, name_vectors(base), labels),
    }
    for which, weight in chosen.items():
        scores[f"names cv {which}"] = accuracy(z + weight * (xdev @ names.T))
    for temperature in EM_TEMPERATURES:
        posteriors = _softmax(z / temperature)
        scores[f"em {temperature:g}"] = accuracy(np.log(posteriors) + np.log(em_priors(posteriors)))
    pool_posteriors = _softmax(_logits(head, xpool))
    guessed, confidence = pool_posteriors.argmax(axis=1), pool_posteriors.max(axis=1)
    per = max(1, min(SELF_TRAINING_PER_CLASS, *(int(np.sum(guessed == k)) for k in range(len(labels)))))
    kept = np.concatenate(
        [
            np.flatnonzero(guessed == k)[np.argsort(-confidence[guessed == k])][:per]
            for k in range(len(labels))
        ]
    )
    refit = _lr(np.concatenate([xtr, xpool[kept]]), np.concatenate([ytr, classes[guessed[kept]]]))
    scores["self"] = accuracy(_logits(refit, xdev))
    tuned, original = body.state_dict(), base.state_dict()
    for alpha in WISE_ALPHAS:
        mixed = copy.deepcopy(body)
        mixed.load_state_dict(
            {
                k: alpha * v + (1 - alpha) * original[k] if v.is_floating_point() else v
                for k, v in tuned.items()
            }
        )
        scores[f"wise {alpha:g}"] = accuracy(
            _logits(
                _lr(embed([r["text"] for r in train], mixed), ytr), embed([r["text"] for r in dev], mixed)
            )
        )
    return {
        "corpus": corpus,
        "recipe": recipe,
        "body_learning_rate": learning_rate,
        "seed": seed,
        "per_class": per_class,
        "n_dev": len(dev),
        "n_pool": len(pool),
        "train_seconds": round(train_seconds, 1),
        "gate": {"use": gate.use, "zero_shot_accuracy": gate.zero_shot_accuracy, "bar": gate.bar},
        "cv_name_weight": chosen,
        "accuracy": scores,
    }


def render(results: list[dict[str, Any]]) -> str:
    candidates = list(results[0]["accuracy"])
    lines = [
        "| corpus | " + " | ".join(candidates) + " |",
        "|---|" + "---:|" * len(candidates),
    ]
    for r in results:
        a = r["accuracy"]
        lines.append(f"| {r['corpus']} | " + " | ".join(f"{100 * a[c]:.1f}" for c in candidates) + " |")
    means = [
        statistics.fmean(100 * (r["accuracy"][c] - r["accuracy"]["lr"]) for r in results) for c in candidates
    ]
    lines.append("| mean − lr | " + " | ".join(f"{m:+.1f}" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpora", nargs="+", default=DEFAULT_CORPORA)
    parser.add_argument(
        "--seed", type=int, default=100, help="a seed the verdict (accuracy.py, 0..4) does not use"
    )
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--pool", type=int, default=1000, help="unlabelled texts for self-training")
    parser.add_argument("--recipe", default="setfit", help="the body's recipe (model/recipes.py)")
    parser.add_argument("--body-learning-rate", type=float, default=HYPERPARAMETERS["body_learning_rate"])
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--out", default=str(HERE.parent / "bench-results" / "head-candidates.json"))
    args = parser.parse_args()
    from stream_classifier.model.format import load_body

    base = load_body(args.base_model or _default_base(), device="cpu")
    base.max_seq_length = HYPERPARAMETERS["max_seq_length"]
    results = []
    for corpus in args.corpora:
        results.append(probe(corpus, base, args))
        print(json.dumps(results[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"hyperparameters": HYPERPARAMETERS, "machine": _machine(), "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render(results))


if __name__ == "__main__":
    main()
