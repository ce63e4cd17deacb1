"""The cascade's frontier: throughput against accuracy lost, MiniLM alone vs cascade vs student.

For every corpus (the bundled sample, and the benchmark corpora under
``~/.cache/stream-classifier/datasets``, built by ``benchmarks/datasets/build.py``):

1. draw ``--per-class`` training examples per label (seeded) from its training file and up
   to ``--holdout`` other training rows for the bound;
2. fine-tune MiniLM on them (the retrainer's defaults: 20 iterations, 1 epoch, batch 16,
   64 training tokens) and save the model directory;
3. build its student in one call (``model.cascade.build_cascade``: model2vec distillation,
   head, temperature, the bound for ``--target-loss`` fitted on the holdout rows);
4. score MiniLM alone, the student alone and the cascade at the fitted bound and at fixed
   bounds on the test file (``--test-limit`` rows): accuracy, the student's share, and the
   accuracy lost against MiniLM alone, in points;
5. time each of them on the first ``--speed-texts`` test texts in micro-batches of
   ``--batch`` (prepare + infer on one thread, serving's defaults otherwise), interleaved
   in ``--rounds`` rounds; speed is the median over rounds of each round's ratio to MiniLM.

Resumable: model directories and students stay under ``--work``; each finished corpus is
one JSON line in ``--out``, and a rerun skips corpora already there. ``report`` prints the
tables from ``--out``. Run it niced (``nice -n 19``): it is all CPU.

    nice -n 19 .venv/bin/python benchmarks/cascade.py --out bench-results/cascade.jsonl
    .venv/bin/python benchmarks/cascade.py report --out bench-results/cascade.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATASETS = Path.home() / ".cache" / "stream-classifier" / "datasets"
DEFAULT_CORPORA = ["sample", "sa-heldout", "rt-sentiment", "wordnet-topics5"]
FIXED_BOUNDS = [0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6]
TIMED_BOUNDS = [0.95, 0.9, 0.8]


def _machine() -> dict[str, Any]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    features = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "features": features}


def _split(corpus: str, per_class: int, holdout: int, test_limit: int, seed: int) -> tuple[list, list, list]:
    from stream_classifier.model.examples import read_examples
    from stream_classifier.samples import sample_path

    if corpus == "sample":
        train_file, test_file = sample_path("train"), sample_path("eval")
    else:
        train_file, test_file = DATASETS / corpus / "train.jsonl", DATASETS / corpus / "test.jsonl"
    pool = read_examples(train_file).examples
    test = read_examples(test_file).examples[:test_limit]
    rng = random.Random(seed)
    rng.shuffle(pool)
    chosen: dict[str, int] = {}
    train, rest = [], []
    for example in pool:
        if chosen.get(example.label, 0) < per_class:
            chosen[example.label] = chosen.get(example.label, 0) + 1
            train.append(example)
        else:
            rest.append(example)
    return train, rest[:holdout], test


def _model_dir(work: Path, corpus: str, train: list, seed: int, head_only: bool) -> tuple[Path, float | None]:
    from stream_classifier.model.format import save_model
    from stream_classifier.model.training import TrainingConfig, train_model
    from stream_classifier.samples import require_offline_minilm

    target = work / corpus / ("model-head-only" if head_only else "model")
    if (target / "model_metadata.json").is_file():
        return target, None
    config = TrainingConfig(
        num_iterations=20,
        epochs=1,
        batch_size=16,
        max_seq_length=64,
        seed=seed,
        head_only=head_only,
        show_progress_bar=False,
    )
    started = time.perf_counter()
    base = require_offline_minilm("use --work with trained models")
    bundle = train_model(train, base, config, device="cpu")
    seconds = time.perf_counter() - started
    save_model(bundle, target, overwrite=True)
    return target, seconds


def _base_static(work: Path) -> Any:
    """The student of the bare offline MiniLM, distilled once and shared by head-only models."""
    from model2vec import StaticModel

    from stream_classifier.model.student import distill_static
    from stream_classifier.samples import require_offline_minilm

    folder = work / "static-minilm"
    if not (folder / "model.safetensors").is_file():
        distill_static(require_offline_minilm("use --work with a distilled student")).save_pretrained(folder)
    return StaticModel.from_pretrained(folder, quantize_to="float32")


def _builders(model_dir: Path) -> dict[str, float]:
    """Seconds to distil the same body with model2vec.distill and with StaticEmbedding."""
    from model2vec.distill import distill
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    times = {}
    started = time.perf_counter()
    distill(str(model_dir), pca_dims=256, device="cpu")
    times["model2vec_distill_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    StaticEmbedding.from_distillation(str(model_dir), pca_dims=256, device="cpu")
    times["static_embedding_from_distillation_s"] = round(time.perf_counter() - started, 1)
    return times


def _batched(predict: Callable[[list[str]], Any], texts: Sequence[str], batch: int) -> Any:
    import numpy as np

    parts = [np.asarray(predict(list(texts[i : i + batch]))) for i in range(0, len(texts), batch)]
    return np.concatenate(parts)


def _scores(labels: list[str], test: list, teacher_p: Any, student_p: Any, bounds: list[float]) -> list[dict]:
    import numpy as np

    truth = np.array([labels.index(e.label) if e.label in labels else -1 for e in test])
    teacher_right = teacher_p.argmax(axis=1) == truth
    student_right = student_p.argmax(axis=1) == truth
    base = float(teacher_right.mean())
    rows = []
    for bound in bounds:
        sure = student_p.max(axis=1) >= bound
        accuracy = float(np.where(sure, student_right, teacher_right).mean())
        rows.append(
            {
                "bound": bound,
                "student_share": round(float(sure.mean()), 4),
                "accuracy": round(accuracy, 4),
                "loss_pts": round(100 * (base - accuracy), 2),
            }
        )
    return rows


Runner = Callable[[list[str]], Any]


def _speeds(runners: dict[str, Runner], texts: list[str], batch: int, rounds: int) -> dict:
    """Every runner on every micro-batch in turn (order rotated), so load changes hit all alike."""
    wall = dict.fromkeys(runners, 0.0)
    cpu = dict.fromkeys(runners, 0.0)
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    for run in runners.values():  # one warm batch each
        run(batches[0])
    names = list(runners)
    turn = 0
    for _ in range(rounds):
        for chunk in batches:
            turn += 1
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                started, started_cpu = time.perf_counter(), time.process_time()
                runners[name](chunk)
                wall[name] += time.perf_counter() - started
                cpu[name] += time.process_time() - started_cpu
    n = rounds * len(texts)
    return {
        name: {
            "msg_s": round(n / wall[name], 1),
            "vs_minilm": round(wall["minilm"] / wall[name], 2),
            "cpu_ms_per_msg": round(1000 * cpu[name] / n, 2),
            "cpu_vs_minilm": round(cpu["minilm"] / cpu[name], 2),
        }
        for name in names
    }


def run_corpus(corpus: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from stream_classifier.model.cascade import CascadeRuntime, build_cascade
    from stream_classifier.model.runtime import ModelRuntime
    from stream_classifier.model.student import NEVER, Student, build_student

    train, holdout, test = _split(corpus, args.per_class, args.holdout, args.test_limit, args.seed)
    model_dir, train_s = _model_dir(Path(args.work), corpus, train, args.seed, args.head_only)
    transformer = ModelRuntime.load(model_dir, device="cpu")
    transformer.warmup()
    record: dict[str, Any] = {
        "corpus": corpus,
        "labels": transformer.labels,
        "train": len(train),
        "holdout": len(holdout),
        "test": len(test),
        "training_s": None if train_s is None else round(train_s, 1),
        "body": "MiniLM, head only" if args.head_only else "MiniLM fine-tuned",
        "max_seq_length": transformer.max_seq_length,
        "threads": torch.get_num_threads(),
    }
    if args.compare_builders:
        record["builders"] = _builders(model_dir)
    started = time.perf_counter()
    if args.head_only:  # the body is the bare MiniLM: its distillation is shared
        static = _base_static(Path(args.work))
        build_student(
            model_dir, transformer, train, holdout=holdout, target_loss=args.target_loss, static=static
        )
    else:
        build_cascade(model_dir, holdout=holdout, target_loss=args.target_loss)
    record["build_s"] = round(time.perf_counter() - started, 1)
    student = Student.load(model_dir, model_version=transformer.version)
    spec = student.spec
    record["student_fit"] = {"bound": student.bound, "temperature": spec.temperature, **spec.fit}
    texts = [e.text for e in test]
    teacher_p = _batched(transformer.predict_proba, texts, args.batch)
    student_p = _batched(student.predict_proba, texts, args.batch)
    bounds = [NEVER, student.bound, *[b for b in FIXED_BOUNDS if b != student.bound], 0.0]
    record["frontier"] = _scores(transformer.labels, test, teacher_p, student_p, bounds)
    runners: dict[str, Runner] = {
        "minilm": transformer.predict_proba,
        "student": student.predict_proba,
    }
    for bound in [student.bound, *[b for b in TIMED_BOUNDS if b != student.bound]]:
        runners[f"cascade@{bound:.4g}"] = CascadeRuntime(transformer, student, bound=bound).predict_proba
    record["speed"] = _speeds(runners, texts[: args.speed_texts], args.batch, args.rounds)
    record["speed_texts"] = min(args.speed_texts, len(texts))
    timed = student_p[: args.speed_texts].max(axis=1)
    for name, figures in record["speed"].items():  # the student's share of the timed texts
        if name.startswith("cascade@"):
            figures["timed_share"] = round(float((timed >= float(name.split("@")[1])).mean()), 4)
    return record


def report(out: Path) -> None:
    for line in out.read_text().splitlines():
        r = json.loads(line)
        fit = r["student_fit"]
        print(
            f"\n### {r['corpus']} ({len(r['labels'])} labels; train {r['train']}, bound fitted on "
            f"{r['holdout']} held-out rows, scored on {r['test']} test rows; build {r['build_s']} s)"
        )
        print(f"fitted bound {fit['bound']:.4g} (T={fit['temperature']:.3g}); machine: {r.get('machine')}")
        print("| decider | bound | student share | accuracy | loss (pts) | msg/s | × MiniLM | CPU × MiniLM |")
        print("|---|---|---|---|---|---|---|---|")
        speed = r["speed"]
        for row in r["frontier"]:
            b = row["bound"]
            name = "minilm" if b > 1 else "student" if b == 0 else f"cascade@{b:.4g}"
            s = speed.get(name, {})
            label = "fitted" if b == fit["bound"] else ""
            bound = "—" if b > 1 or b == 0 else f"{b:.4g} {label}".strip()
            kind = name.split("@", maxsplit=1)[0]
            print(
                f"| {kind} | {bound} | {row['student_share']:.1%} | {row['accuracy']:.4f} | "
                f"{row['loss_pts']:+.2f} | {s.get('msg_s', '')} | {s.get('vs_minilm', '')} | "
                f"{s.get('cpu_vs_minilm', '')} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    parser.add_argument("--corpora", nargs="+", default=DEFAULT_CORPORA)
    parser.add_argument("--per-class", type=int, default=32)
    parser.add_argument("--holdout", type=int, default=400)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--speed-texts", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-loss", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--compare-builders", action="store_true", help="also time StaticEmbedding's distill")
    parser.add_argument(
        "--head-only", action="store_true", help="no body fine-tuning: one shared distillation of MiniLM"
    )
    parser.add_argument("--work", default="bench-results/cascade-work")
    parser.add_argument("--out", default="bench-results/cascade.jsonl")
    args = parser.parse_args()
    out = Path(args.out)
    if args.command == "report":
        report(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = out.read_text().splitlines() if out.is_file() else []
    done = {json.loads(line)["corpus"] for line in lines}
    for corpus in args.corpora:
        if corpus in done:
            continue
        if corpus != "sample" and not (DATASETS / corpus / "test.jsonl").is_file():
            print(f"{corpus}: not built (benchmarks/datasets/build.py); skipped", file=sys.stderr)
            continue
        record = {**run_corpus(corpus, args), "machine": _machine()}
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    report(out)


if __name__ == "__main__":
    main()
