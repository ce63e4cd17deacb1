"""Labelled feedback: decoding, the bounded de-duplicated training set, the held-out split.

A feedback message is a JSON object ``{"text": str, "label": str, "id"?: str | int}``.
:func:`decode_feedback` turns its bytes into a :class:`FeedbackItem` or a
:class:`Rejected` carrying a dead-letter reason from
:data:`stream_classifier.ops.metrics.DEAD_LETTER_REASONS`; it never raises.

:class:`FeedbackSet` invariants:

- one entry per key: the ``id`` when given, else the pair (text, label). A repeat of a key
  with the same label is a no-op; a relabelled id moves to its new label (latest wins);
- at most ``max_examples_per_label`` entries per label, kept by reservoir sampling (seeded,
  so a rebuild from the same topic content keeps the same entries), and at most
  ``max_labels`` labels; memory is therefore bounded by their product. Only held entries
  are remembered, so a repeat of an entry the reservoir dropped counts as a new sighting;
- an entry's side of the train/held-out split is a pure function of its id (or, without
  one, its text), so it never changes across restarts and the same text never sits on
  both sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from dataclasses import dataclass
from typing import Literal

from stream_classifier.config import Settings
from stream_classifier.errors import BrokerUnavailableError, StreamClassifierError
from stream_classifier.learn.tail import TopicReader, offsets_key
from stream_classifier.model.examples import Example
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import DeadLetterReason, Metrics
from stream_classifier.stream.codec import Rejected as CodecRejected
from stream_classifier.stream.codec import encode_dead_letter
from stream_classifier.transport import Producer, Record

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """One valid feedback message."""

    text: str
    label: str
    id: str | None = None

    @property
    def key(self) -> str:
        """The de-duplication key: the id when given, else text and label together."""
        if self.id is not None:
            return "id:" + self.id
        return "tl:" + json.dumps([self.text, self.label], ensure_ascii=False)

    @property
    def split_key(self) -> str:
        """What decides the held-out side: the id when given, else the text alone."""
        return self.id if self.id is not None else self.text


@dataclass(frozen=True, slots=True)
class Rejected:
    """A feedback message that cannot be used: the dead-letter reason and a human detail."""

    reason: DeadLetterReason
    detail: str


def decode_feedback(value: bytes | None, max_bytes: int) -> FeedbackItem | Rejected:
    """Decode one feedback message value; see the module docstring for the format."""
    if value is None:
        return Rejected("null_value", "the message has no value")
    if len(value) > max_bytes:
        return Rejected("too_large", f"{len(value)} bytes exceeds feedback.max_bytes={max_bytes}")
    try:
        raw = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("invalid_utf8", f"not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Rejected("invalid_json", f"not JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return Rejected("not_an_object", "feedback must be a JSON object with 'text' and 'label'")
    text = _non_blank_string(obj, "text", "missing_text", "text_not_string", "empty_text")
    if isinstance(text, Rejected):
        return text
    label = _non_blank_string(obj, "label", "missing_label", "invalid_label", "missing_label")
    if isinstance(label, Rejected):
        return label
    label = label.strip()
    raw_id = obj.get("id")
    if raw_id is None:
        return FeedbackItem(text=text, label=label)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or str(raw_id) == "":
        return Rejected("invalid_id", "'id' must be a non-empty string or an integer")
    return FeedbackItem(text=text, label=label, id=str(raw_id))


def _non_blank_string(
    obj: dict[str, object],
    field: str,
    missing: DeadLetterReason,
    not_string: DeadLetterReason,
    blank: DeadLetterReason,
) -> str | Rejected:
    """``obj[field]`` if it is a string with a non-space character, else the reason it is not."""
    value = obj.get(field)
    if value is None:
        return Rejected(missing, f"'{field}' is missing")
    if not isinstance(value, str):
        return Rejected(not_string, f"'{field}' must be a string")
    if not value.strip():
        return Rejected(blank, f"'{field}' is empty")
    return value


def is_held_out(split_key: str, fraction: float) -> bool:
    """Whether ``split_key`` belongs to the held-out side (stable across processes)."""
    digest = hashlib.sha256(split_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


AddOutcome = Literal["added", "relabelled", "duplicate", "dropped", "label_limit"]


@dataclass(frozen=True)
class FeedbackSnapshot:
    """The held feedback split for one retraining run."""

    train: list[Example]
    holdout: list[Example]

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.train} | {e.label for e in self.holdout})


class FeedbackSet:
    """The bounded, de-duplicated set of feedback examples (not thread-safe; see the reader)."""

    def __init__(
        self, *, max_per_label: int, max_labels: int, holdout_fraction: float, seed: int = 0
    ) -> None:
        self._max_per_label = max_per_label
        self._max_labels = max_labels
        self._holdout_fraction = holdout_fraction
        self._rng = random.Random(seed)
        self._items: dict[str, FeedbackItem] = {}
        # Per label: the held keys (the reservoir) and how many distinct sightings it has had.
        self._reservoirs: dict[str, list[str]] = {}
        self._seen: dict[str, int] = {}
        self._fresh = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def fresh(self) -> int:
        """Fresh examples added or relabelled and not yet used by a run (:meth:`consume_fresh`)."""
        return self._fresh

    def consume_fresh(self, count: int) -> None:
        """Forget ``count`` fresh examples (a retraining run has used them)."""
        self._fresh = max(self._fresh - count, 0)

    def counts(self) -> dict[str, int]:
        """Held examples per label."""
        return {label: len(keys) for label, keys in self._reservoirs.items()}

    def add(self, item: FeedbackItem, *, fresh: bool = True) -> AddOutcome:
        """Add ``item``; ``fresh=False`` for items an earlier run already had (restart rebuild)."""
        key = item.key
        previous = self._items.get(key)
        if previous is not None and previous.label == item.label and previous.text == item.text:
            return "duplicate"
        if item.label not in self._reservoirs and self._labels_without(previous) >= self._max_labels:
            return "label_limit"
        if previous is not None:
            self._remove(key, previous.label)
        outcome: AddOutcome = "relabelled" if previous is not None else "added"
        if not self._admit(key, item.label):
            return "dropped"
        self._items[key] = item
        if fresh:
            self._fresh += 1
        return outcome

    def _labels_without(self, previous: FeedbackItem | None) -> int:
        """How many labels would be held once ``previous`` (being relabelled) is gone."""
        held = len(self._reservoirs)
        if previous is not None and len(self._reservoirs[previous.label]) == 1:
            return held - 1
        return held

    def _admit(self, key: str, label: str) -> bool:
        """Reservoir sampling within ``label``: room, or replace a random held key."""
        reservoir = self._reservoirs.setdefault(label, [])
        seen = self._seen.get(label, 0) + 1
        self._seen[label] = seen
        if len(reservoir) < self._max_per_label:
            reservoir.append(key)
            return True
        slot = self._rng.randrange(seen)
        if slot >= self._max_per_label:
            return False
        del self._items[reservoir[slot]]
        reservoir[slot] = key
        return True

    def _remove(self, key: str, label: str) -> None:
        del self._items[key]
        reservoir = self._reservoirs[label]
        reservoir.remove(key)
        if not reservoir:
            del self._reservoirs[label]
            del self._seen[label]

    def snapshot(self) -> FeedbackSnapshot:
        """The held examples, split into train and held-out, in a stable (key) order."""
        train: list[Example] = []
        holdout: list[Example] = []
        for key in sorted(self._items):
            item = self._items[key]
            side = holdout if is_held_out(item.split_key, self._holdout_fraction) else train
            side.append(Example(text=item.text, label=item.label))
        return FeedbackSnapshot(train=train, holdout=holdout)


class FeedbackReader:
    """Keeps a :class:`FeedbackSet` equal to the feedback topics, read from their beginning.

    Runs on its own thread (:meth:`run` until :meth:`stop`). Records below ``baseline``
    (the offsets the last retraining run had read, from the manifest) rebuild the set
    without counting as fresh and without being dead-lettered again; records at or after
    it are fresh, and bad ones go to the dead-letter topic once.
    """

    def __init__(
        self,
        settings: Settings,
        producer: Producer,
        metrics: Metrics,
        *,
        baseline: dict[str, int] | None = None,
    ) -> None:
        fb = settings.feedback
        self._settings = settings
        self._producer = producer
        self._metrics = metrics
        self._baseline = dict(baseline or {})
        self._set = FeedbackSet(
            max_per_label=fb.max_examples_per_label,
            max_labels=fb.max_labels,
            holdout_fraction=settings.retrain.holdout_fraction,
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._positions: dict[str, int] = {}
        self._gauged: set[str] = set()
        self.caught_up = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Read until stopped; the first pass to the end offsets sets :attr:`caught_up`."""
        try:
            reader = TopicReader(self._settings.kafka, self._settings.feedback.topics, start="beginning")
        except StreamClassifierError as exc:
            self.error = exc
            log_event(logger, "feedback_reader_failed", logging.ERROR, error=str(exc))
            return
        try:
            targets = reader.end_offsets()
            while not self._stop.is_set():
                try:
                    records = reader.poll(0.5)
                except BrokerUnavailableError as exc:
                    log_event(logger, "feedback_read_retry", logging.WARNING, error=str(exc))
                    self._stop.wait(1.0)
                    continue
                for record in records:
                    self._take(record)
                if records:
                    self._update_gauges()
                positions = reader.positions()
                with self._lock:
                    self._positions = positions
                if not self.caught_up.is_set() and all(positions[k] >= end for k, end in targets.items()):
                    self.caught_up.set()
                    log_event(
                        logger, "feedback_rebuilt", examples=len(self._set), per_label=self._set.counts()
                    )
        finally:
            reader.close()

    def stop(self) -> None:
        self._stop.set()

    def _update_gauges(self) -> None:
        """Examples held per label; a label no longer held reads 0."""
        with self._lock:
            counts = self._set.counts()
        for label in self._gauged | counts.keys():
            self._metrics.feedback_examples.labels(label=label).set(counts.get(label, 0))
        self._gauged |= counts.keys()

    def _take(self, record: Record) -> None:
        fresh = record.offset >= self._baseline.get(offsets_key(record.topic, record.partition), 0)
        item = decode_feedback(record.value, self._settings.feedback.max_bytes)
        if isinstance(item, FeedbackItem):
            with self._lock:
                outcome = self._set.add(item, fresh=fresh)
            if outcome == "label_limit":
                limit = self._settings.feedback.max_labels
                item = Rejected(
                    "too_many_labels", f"label {item.label!r} would exceed feedback.max_labels={limit}"
                )
            else:
                self._metrics.feedback_received.inc()
                return
        if fresh:
            self._dead_letter(record, item)

    def _dead_letter(self, record: Record, rejected: Rejected) -> None:
        letter = encode_dead_letter(
            record,
            CodecRejected(rejected.reason, rejected.detail),
            self._settings.kafka.dead_letter_topic,
            self._settings.kafka.max_request_size,
        )

        def delivered(error: BaseException | None) -> None:
            if error is not None:
                self._metrics.produce_errors.inc()
                log_event(logger, "feedback_dead_letter_failed", logging.ERROR, error=str(error))

        self._producer.send(
            letter.topic, letter.value, key=letter.key, headers=letter.headers, on_delivery=delivered
        )
        self._metrics.dead_letters.labels(reason=rejected.reason).inc()
        log_event(
            logger,
            "feedback_rejected",
            reason=rejected.reason,
            detail=rejected.detail,
            source=f"{record.topic}:{record.partition}:{record.offset}",
        )

    def snapshot(self) -> tuple[FeedbackSnapshot, dict[str, int], int]:
        """The split set, the offsets it reflects, and how many fresh examples it holds."""
        with self._lock:
            return self._set.snapshot(), dict(self._positions), self._set.fresh

    @property
    def fresh(self) -> int:
        with self._lock:
            return self._set.fresh

    def consumed(self, fresh: int) -> None:
        """A retraining run used ``fresh`` of the fresh examples (others may have arrived since)."""
        with self._lock:
            self._set.consume_fresh(fresh)
