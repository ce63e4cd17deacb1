"""Retraining: the schedule, the challenger run, the promotion gate and the hand-off to serving.

One retraining run (:meth:`Retrainer.run_once`):

1. **load** — take the feedback snapshot (train / held-out split) and the offsets it
   reflects, the champion's kept training examples and the trusted evaluation set;
2. **train** and **evaluate** — in a separate, throttled process (:mod:`.challenger`),
   which calibrates the challenger's head on the held-out split (``decision.target_precision``
   fits its thresholds) and scores both models with ``ece`` and ``log_loss`` too;
3. **gate** (:mod:`.gate`) — promote only if the challenger's held-out macro-F1 beats the
   champion's by more than ``min_improvement`` (a tie does not promote), its held-out
   accuracy does not fall, and, when a trusted set is configured, neither its macro-F1 nor
   its accuracy falls below the champion's there;
4. **swap** — (``model.cascade``: build its student, :mod:`.promoted_student`) record the
   version as current, announce it, and hot-swap it in (loaded and warmed before the swap).

Invariants:

- at most one run at a time per store (an exclusive lock on ``<store>/.trainer.lock``
  held by the trainer for its lifetime), so only one process trains;
- a run that fails (exception, out of memory, killed child) changes neither the store nor
  what is served; it is counted as ``failed`` and its fresh examples stay fresh, so the
  next scheduled tick retries;
- every run that starts emits exactly one ``retrain_run`` record (log line, and the
  events topic when configured) with outcome, reason, scores and phase durations; so does
  every request made before the feedback topics are read to their end (no run starts).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from stream_classifier.config import RetrainSettings, Settings
from stream_classifier.errors import ModelStoreError, TrainingError
from stream_classifier.learn.challenger import JobResult, JobSpec, Scores, run_job, write_examples
from stream_classifier.learn.feedback import FeedbackReader, decode_feedback
from stream_classifier.learn.feedback_set import FeedbackItem, FeedbackSnapshot
from stream_classifier.learn.gate import gate
from stream_classifier.learn.promoted_student import build_promoted_student
from stream_classifier.learn.store import ModelStore
from stream_classifier.learn.updates import ModelSwapper, announce
from stream_classifier.model.examples import Example, read_examples
from stream_classifier.model.format import EXAMPLES_FILE, load_head, new_version_id
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.transport import Producer, make_reader

logger = logging.getLogger(__name__)

Outcome = Literal["promoted", "rejected", "skipped", "failed"]
_TOPIC_PREFIX = "topic:"
_TRUSTED_READ_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- data


def merge_training_set(snapshot: FeedbackSnapshot, kept: list[Example]) -> list[Example]:
    """Feedback's train side plus the champion's kept examples.

    A kept example whose text also appears in feedback (either side) is dropped: feedback
    is newer (a relabel wins) and a held-out text must never be trained on.
    """
    feedback_texts = {e.text for e in snapshot.train} | {e.text for e in snapshot.holdout}
    seen: set[tuple[str, str]] = set()
    merged: list[Example] = []
    for example in [*snapshot.train, *(e for e in kept if e.text not in feedback_texts)]:
        if (example.text, example.label) not in seen:
            seen.add((example.text, example.label))
            merged.append(example)
    return merged


def job_spec(settings: Settings, champion_dir: Path, cache_dir: Path) -> JobSpec:
    """The challenger job for ``settings``.

    The body trains at ``retrain.train_max_seq_length``; head-mode embeddings and the gate's
    scores use ``model.max_seq_length``, the truncation the service serves with.
    """
    retrain, model = settings.retrain, settings.model
    return JobSpec(
        mode=retrain.mode,
        champion_dir=str(champion_dir),
        version=new_version_id(),
        device=retrain.device or model.device,
        precision=model.precision,
        max_seq_length=model.max_seq_length,
        torch_threads=retrain.torch_threads,
        nice=retrain.nice,
        max_memory_mb=retrain.max_memory_mb,
        gpu_memory_fraction=retrain.gpu_memory_fraction,
        cache_dir=str(cache_dir),
        max_examples_per_label=settings.feedback.max_examples_per_label,
        seed=retrain.seed,
        training=training_options(retrain),
        target_precision=dict(settings.decision.target_precision),
    )


def training_options(retrain: RetrainSettings) -> dict[str, Any]:
    """The :class:`~stream_classifier.model.training.TrainingConfig` fields ``retrain.*`` sets.

    The seed and the per-label cap travel beside them (see :class:`JobSpec`).
    """
    return {
        "num_iterations": retrain.num_iterations,
        "epochs": retrain.epochs,
        "batch_size": retrain.batch_size,
        "body_learning_rate": retrain.learning_rate,
        "max_steps": retrain.max_steps,
        "max_seq_length": retrain.train_max_seq_length,
        "recipe": retrain.recipe,
    }


def load_trusted_eval(settings: Settings) -> list[Example]:
    """The trusted evaluation set: a JSONL/CSV file, or ``topic:NAME`` read from its beginning."""
    spec = settings.retrain.trusted_eval
    if not spec:
        return []
    if not spec.startswith(_TOPIC_PREFIX):
        return read_examples(Path(spec)).examples
    reader = make_reader(settings.kafka, [spec[len(_TOPIC_PREFIX) :]], start="beginning")
    try:
        records = reader.read_to_end(_TRUSTED_READ_TIMEOUT_S)
    finally:
        reader.close()
    items = [decode_feedback(r.value, settings.feedback) for r in records]
    examples = [Example(i.text, i.label) for i in items if isinstance(i, FeedbackItem)]
    if len(examples) < len(items):
        log_event(logger, "trusted_eval_bad_records", logging.WARNING, skipped=len(items) - len(examples))
    return examples


def champion_labels(store: ModelStore) -> list[str]:
    """The current version's labels: the feedback labels that always have a slot."""
    return load_head(store.current()[1])[0].classes


def _kept_examples(model_dir: Path) -> list[Example]:
    path = model_dir / EXAMPLES_FILE
    return read_examples(path, skip_bad_rows=True).examples if path.is_file() else []


# --------------------------------------------------------------------------- the record


@dataclass
class RunRecord:
    """The one structured record of a retraining run."""

    run_id: str
    trigger: str
    mode: str
    champion: str
    outcome: Outcome = "failed"
    reason: str = ""
    challenger: str | None = None
    labels: list[str] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    scores: dict[str, dict[str, Scores]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # the challenger's (see challenger.py)
    durations: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- the retrainer


class TrainerLock:
    """The store-wide trainer lock: only the holder may train (see the module docstring)."""

    def __init__(self, store: ModelStore) -> None:
        store.root.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = (store.root / ".trainer.lock").open("a")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise ModelStoreError(
                f"another trainer holds {store.root}/.trainer.lock: only one process may retrain; "
                "ask it with POST /retrain on its ops port"
            ) from None

    def release(self) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


class Retrainer:
    """Runs retraining on a schedule and on demand; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        feedback: FeedbackReader,
        metrics: Metrics,
        producer: Producer,
        *,
        swapper: ModelSwapper | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._feedback = feedback
        self._metrics = metrics
        self._producer = producer
        self._swapper = swapper
        self._requested = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Lock()
        self.last_record: RunRecord | None = None

    # ------------------------------------------------------------------ control

    def request(self) -> bool:
        """Ask for a run now (the POST /retrain callback); False if one is pending or running."""
        if self._requested.is_set() or self._running.locked():
            return False
        self._requested.set()
        return True

    def stop(self) -> None:
        self._stop.set()
        self._requested.set()

    def run(self) -> None:
        """The schedule: every ``interval_s`` when enough fresh feedback arrived, or when asked.

        The schedule starts once the feedback is read to its end. A request before that runs
        as soon as it is read, or, while the reader is failing, is answered at once with a
        ``failed`` record saying why, so that every request gets an answer.
        """
        retrain = self._settings.retrain
        pending = False
        while not self._stop.is_set() and not self._feedback.caught_up.is_set():
            if self._requested.wait(0.5) and not self._stop.is_set():
                self._requested.clear()
                pending = True
            error = self._feedback.error
            if pending and error is not None:
                self._emit(self._unread_record(error))
                pending = False
        if pending and not self._stop.is_set():
            self.run_once(trigger="request", force=True)
        next_tick = time.monotonic() + retrain.interval_s
        while not self._stop.is_set():
            asked = self._requested.wait(max(0.0, next_tick - time.monotonic()))
            if self._stop.is_set():
                return
            if asked:
                self._requested.clear()
                self.run_once(trigger="request", force=True)
            else:
                next_tick = time.monotonic() + retrain.interval_s
                fresh = self._feedback.fresh
                if fresh >= retrain.min_new_examples:
                    self.run_once(trigger="schedule", force=False)
                else:
                    log_event(logger, "retrain_not_due", logging.DEBUG, fresh=fresh)

    def _unread_record(self, error: BaseException) -> RunRecord:
        """The record of a request made while the feedback topics cannot be read."""
        record = RunRecord(
            run_id=new_version_id(), trigger="request", mode=self._settings.retrain.mode, champion=""
        )
        record.outcome = "failed"
        record.reason = (
            f"the feedback topics cannot be read ({type(error).__name__}: {error}); "
            "the reader retries with backoff"
        )
        return record

    # ------------------------------------------------------------------ one run

    def run_once(self, *, trigger: str, force: bool) -> RunRecord:
        """One retraining run (blocking; never raises); returns its record."""
        with self._running:
            record = RunRecord(
                run_id=new_version_id(), trigger=trigger, mode=self._settings.retrain.mode, champion=""
            )
            try:
                record.champion, champion_dir = self._store.current()
                self._run(record, champion_dir, force=force)
            except Exception as exc:
                record.outcome = "failed"
                record.reason = f"{type(exc).__name__}: {exc}"
                log_event(logger, "retrain_failed", logging.ERROR, run_id=record.run_id, exc_info=exc)
            self._emit(record)
            return record

    @contextlib.contextmanager
    def _timed(self, record: RunRecord, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            record.durations[phase] = round(time.perf_counter() - started, 3)

    def _run(self, record: RunRecord, champion_dir: Path, *, force: bool) -> None:
        retrain = self._settings.retrain
        with self._timed(record, "load"):
            snapshot, offsets, fresh = self._feedback.snapshot()
            train = merge_training_set(snapshot, _kept_examples(champion_dir))
            trusted = load_trusted_eval(self._settings)
        record.labels = sorted({e.label for e in train})
        record.examples = {
            "train": len(train),
            "holdout": len(snapshot.holdout),
            "trusted": len(trusted),
            "fresh": fresh,
        }
        skip = self._skip_reason(fresh, snapshot, record.labels, force=force)
        if skip is not None:
            record.outcome, record.reason = "skipped", skip
            return

        work = self._store.staging_dir(f"run-{record.run_id}-")
        try:
            result = self._challenge(record, work, train, snapshot.holdout, trusted)
            record.challenger = result.version
            record.scores = result.scores
            record.calibration = result.calibration
            record.durations.update({k: round(v, 3) for k, v in result.durations.items()})
            decision = gate(result.scores, min_improvement=retrain.min_improvement, trusted=bool(trusted))
            record.reason = decision.reason
            if not decision.promote:
                record.outcome = "rejected"
                self._store.record_progress(offsets)
            else:
                with self._timed(record, "swap"):
                    self._promote(record, work / "model", result, offsets, snapshot.holdout)
                record.outcome = "promoted"
            self._feedback.consumed(fresh)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _skip_reason(
        self, fresh: int, snapshot: FeedbackSnapshot, labels: list[str], *, force: bool
    ) -> str | None:
        retrain = self._settings.retrain
        if not force and fresh < retrain.min_new_examples:
            return f"{fresh} new examples < retrain.min_new_examples={retrain.min_new_examples}"
        if len(snapshot.holdout) < retrain.min_eval_examples:
            return (
                f"{len(snapshot.holdout)} held-out feedback examples < retrain.min_eval_examples="
                f"{retrain.min_eval_examples}"
            )
        if len(labels) < 2:
            return "the training set has fewer than 2 labels"
        return None

    def _challenge(
        self,
        record: RunRecord,
        work: Path,
        train: list[Example],
        holdout: list[Example],
        trusted: list[Example],
    ) -> JobResult:
        """Train and score the challenger in a throttled child process."""
        spec = job_spec(self._settings, self._store.path_of(record.champion), self._store.root / "cache")
        (work / "job.json").write_text(json.dumps(asdict(spec)), encoding="utf-8")
        write_examples(work / "train.jsonl", train)
        write_examples(work / "holdout.jsonl", holdout)
        write_examples(work / "trusted.jsonl", trusted)
        process = multiprocessing.get_context("spawn").Process(
            target=run_job, args=(str(work),), name=f"challenger-{record.run_id}", daemon=True
        )
        process.start()
        while process.is_alive():
            process.join(0.5)
            if self._stop.is_set():
                process.terminate()
                process.join(10)
                raise TrainingError("the trainer is stopping; the run was abandoned")
        if (work / "result.json").is_file() and process.exitcode == 0:
            return JobResult(**json.loads((work / "result.json").read_text(encoding="utf-8")))
        error_file = work / "error.json"
        if error_file.is_file():
            raise TrainingError(json.loads(error_file.read_text(encoding="utf-8"))["error"])
        raise TrainingError(
            f"the training process died with exit code {process.exitcode} (killed or out of memory?)"
        )

    def _promote(
        self,
        record: RunRecord,
        model_dir: Path,
        result: JobResult,
        offsets: dict[str, int],
        holdout: list[Example],
    ) -> None:
        build_promoted_student(self._settings, model_dir, holdout)  # before any replica can load it
        entry = self._store.add_version(
            model_dir,
            result.version,
            parent=record.champion,
            data_size=result.train_examples,
            metrics=result.scores["challenger"],
            promote=True,
            feedback_offsets=offsets,
        )
        self._metrics.promotions.inc()
        self._feedback.protect(record.labels)
        announce(self._producer, self._settings.retrain.updates_topic, self._store, entry)
        if self._swapper is not None:
            self._swapper.swap_to(entry.version)

    # ------------------------------------------------------------------ the record

    def _emit(self, record: RunRecord) -> None:
        self.last_record = record
        m = self._metrics
        m.retrain_runs.labels(outcome=record.outcome).inc()
        for phase, seconds in record.durations.items():
            m.retrain_duration.labels(phase=phase).observe(seconds)
        for split in ("train", "holdout", "trusted"):
            m.retrain_examples.labels(split=split).set(record.examples.get(split, 0))
        for role, splits in record.scores.items():
            for split, values in splits.items():
                for metric, value in values.items():
                    m.retrain_score.labels(role=role, split=split, metric=metric).set(value)
        payload = asdict(record)
        level = logging.ERROR if record.outcome == "failed" else logging.INFO
        log_event(logger, "retrain_run", level, **payload)
        topic = self._settings.retrain.events_topic
        if topic:
            event = json.dumps({"event": "retrain_run", **payload}).encode("utf-8")
            self._producer.send(
                topic, event, key=record.run_id.encode(), headers=(), on_delivery=_log_failure
            )
            self._producer.flush(10.0)


def _log_failure(error: BaseException | None) -> None:
    if error is not None:
        log_event(logger, "retrain_event_publish_failed", logging.WARNING, error=str(error))
