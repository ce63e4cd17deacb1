"""Labelled feedback: decoding, the bounded de-duplicated training set, the held-out split.

A feedback message is a JSON object ``{"text": str, "label": str, "id"?: str | int}``.
:func:`decode_feedback` turns its bytes into a :class:`FeedbackItem` or a
:class:`Rejected` carrying a dead-letter reason from
:data:`stream_classifier.ops.metrics.DEAD_LETTER_REASONS`; it never raises. Every string
of an item encodes as UTF-8 (JSON ``\\u`` escapes can carry lone surrogates: such texts,
labels and ids are rejected), and a label is at most ``feedback.max_label_chars``
printable characters (no control, format or separator character but the space).

:class:`FeedbackSet` invariants, for the bounds of :class:`FeedbackBounds`:

- one entry per key: a 16-byte BLAKE2b hash of the id when given, else of the pair
  (text, label). A repeat of a key with the same content is a no-op; a relabelled id moves
  to its new label (latest wins), leaving its old label even while the new one is pending;
- a label is *admitted* (in :meth:`~FeedbackSet.snapshot` and
  :meth:`~FeedbackSet.counts`: trained on) or *pending*. The protected labels (the served
  model's and ``feedback.allowed_labels``) are admitted at their first example and each
  reserves one of the ``max_labels`` slots; a model label is never evicted. Any other
  label is pending until it holds ``min_label_examples`` distinct examples, then takes a
  free slot; with none free, it takes the slot of the open label seen the fewest times
  (the least recently seen among equals) only if it has been seen strictly more often, and
  that label's examples are dropped (``label_evicted``). Junk labels therefore never keep
  a label that is seen more often than they are out of a slot;
- at most ``10 * max_labels`` labels are pending, kept by the Space-Saving rule: a
  newcomer to a full table replaces the pending label with the lowest count (the least
  recently seen among equals) and takes over that count plus one, its examples dropped
  (``candidate_evicted``). One-off junk labels replace one another, and a label with more
  than 1/(``10 * max_labels``) of the pending labels' sightings is never replaced;
- at most ``max_per_label`` entries per admitted label and ``min_label_examples`` (or
  ``max_per_label`` if less) per pending one, kept by reservoir sampling (``label_cap``).
  Only held entries are remembered, so a repeat of an entry the set let go counts as a new
  sighting;
- at most ``max_bytes`` of entries, counted as CPython holds them (text, label and id
  objects plus a fixed overhead per entry; a text with one astral character costs four
  bytes a character). Pending labels hold at most an eighth of it: over that, the label
  just seen replaces the lowest pending ones as above. Over the whole, the admitted label holding
  the most bytes gives up a random entry (``byte_budget``), so the labels share the budget;
- so, at most ``max(max_labels, protected)`` admitted labels of ``max_per_label`` entries
  and ``10 * max_labels`` pending labels of ``min_label_examples`` entries, all in at most
  ``max_bytes``. Every choice is seeded, so a rebuild from the same topic content and the
  same protected labels holds the same entries;
- an entry's side of the train/held-out split is a pure function of its id (or, without
  one, its text), so it never changes across restarts and the same text never sits on
  both sides.

:class:`FeedbackReader` invariants: no record and no failure ends its thread. A record
that raises unexpectedly is dead-lettered as ``processing_failed`` (coordinates and reason
only) and counted; a failure of the read loop is logged, counted and retried with a
backoff that grows, resuming after the last record taken, and :attr:`FeedbackReader.error`
says what failed until a poll succeeds again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

from stream_classifier.config import FeedbackSettings, Settings
from stream_classifier.errors import BrokerUnavailableError, ConfigError
from stream_classifier.learn.tail import TopicReader, offsets_key
from stream_classifier.model.examples import Example
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import DeadLetterReason, FeedbackDropReason, Metrics
from stream_classifier.stream.backoff import Backoff
from stream_classifier.stream.codec import OutgoingRecord, encode_dead_letter, minimal_dead_letter, source_id
from stream_classifier.stream.codec import Rejected as CodecRejected
from stream_classifier.transport import Producer, Record

logger = logging.getLogger(__name__)

_KEY_BYTES = 16
# An entry's own objects besides its strings: the entry, its item, its key, a dict slot, a list slot.
_ENTRY_OVERHEAD = 320
# Pending labels: up to this many per label slot, in up to this share of the byte budget.
_PENDING_PER_SLOT = 10
_PENDING_SHARE = 8  # 1/8
_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """One valid feedback message."""

    text: str
    label: str
    id: str | None = None

    @property
    def key(self) -> bytes:
        """The de-duplication key: a 16-byte hash of the id when given, else of text and label."""
        digest = hashlib.blake2b(digest_size=_KEY_BYTES)
        if self.id is not None:
            digest.update(b"id\0" + self.id.encode("utf-8", "surrogatepass"))
        else:
            label = self.label.encode("utf-8", "surrogatepass")
            digest.update(b"tl%d\0" % len(label) + label)
            digest.update(self.text.encode("utf-8", "surrogatepass"))
        return digest.digest()

    @property
    def split_key(self) -> str:
        """What decides the held-out side: the id when given, else the text alone."""
        return self.id if self.id is not None else self.text


@dataclass(frozen=True, slots=True)
class Rejected:
    """A feedback message that cannot be used: the dead-letter reason and a human detail."""

    reason: DeadLetterReason
    detail: str


def decode_feedback(value: bytes | None, settings: FeedbackSettings) -> FeedbackItem | Rejected:
    """Decode one feedback message value; see the module docstring for the format."""
    if value is None:
        return Rejected("null_value", "the message has no value")
    if len(value) > settings.max_bytes:
        return Rejected("too_large", f"{len(value)} bytes exceeds feedback.max_bytes={settings.max_bytes}")
    try:
        raw = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("invalid_utf8", f"not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # too deep, or an integer over the digit limit
        return Rejected("invalid_json", f"not JSON ({str(exc)[:200]})")
    if not isinstance(obj, dict):
        return Rejected("not_an_object", "feedback must be a JSON object with 'text' and 'label'")
    text = obj.get("text")
    if text is None:
        return Rejected("missing_text", "'text' is missing")
    if not isinstance(text, str):
        return Rejected("text_not_string", "'text' must be a string")
    if not text.strip():
        return Rejected("empty_text", "'text' is empty")
    if not _encodable(text):
        return Rejected("invalid_text", "'text' holds a lone surrogate escape")
    label = checked_label(obj.get("label"), settings.max_label_chars)
    if isinstance(label, Rejected):
        return label
    raw_id = obj.get("id")
    if raw_id is None:
        return FeedbackItem(text=text, label=label)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or str(raw_id) == "":
        return Rejected("invalid_id", "'id' must be a non-empty string or an integer")
    if isinstance(raw_id, str) and not _encodable(raw_id):
        return Rejected("invalid_id", "'id' holds a lone surrogate escape")
    return FeedbackItem(text=text, label=label, id=str(raw_id))


def checked_label(value: object, max_chars: int) -> str | Rejected:
    """``value`` stripped, if it is a usable label (see the module docstring), else why not."""
    if value is None:
        return Rejected("missing_label", "'label' is missing")
    if not isinstance(value, str):
        return Rejected("invalid_label", "'label' must be a string")
    label = value.strip()
    if not label:
        return Rejected("missing_label", "'label' is empty")
    if len(label) > max_chars:
        return Rejected(
            "label_too_long", f"{len(label)} characters exceeds feedback.max_label_chars={max_chars}"
        )
    if not label.isprintable():
        bad = next(c for c in label if not c.isprintable())
        return Rejected("invalid_label", f"'label' holds U+{ord(bad):04X}, which is not printable")
    return label


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_held_out(split_key: str, fraction: float) -> bool:
    """Whether ``split_key`` belongs to the held-out side (stable across processes)."""
    digest = hashlib.sha256(split_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


AddOutcome = Literal["added", "pending", "relabelled", "duplicate", "dropped"]
DropCallback = Callable[[FeedbackDropReason, int], None]


@dataclass(frozen=True)
class FeedbackSnapshot:
    """The held feedback split for one retraining run."""

    train: list[Example]
    holdout: list[Example]

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.train} | {e.label for e in self.holdout})


@dataclass(frozen=True)
class FeedbackBounds:
    """The limits of a :class:`FeedbackSet` (see the module docstring)."""

    max_per_label: int
    max_labels: int
    max_bytes: int
    min_label_examples: int

    @staticmethod
    def of(settings: FeedbackSettings) -> FeedbackBounds:
        return FeedbackBounds(
            max_per_label=settings.max_examples_per_label,
            max_labels=settings.max_labels,
            max_bytes=settings.max_held_bytes,
            min_label_examples=settings.min_label_examples,
        )


@dataclass(slots=True)
class _Entry:
    item: FeedbackItem
    size: int
    fresh: bool


@dataclass(slots=True)
class _Label:
    """One label's held keys (its reservoir) and what its slot policy weighs."""

    keys: list[bytes] = field(default_factory=list)
    seen: int = 0  # distinct sightings since the label was taken up
    size: int = 0  # bytes of its entries
    touched: int = 0  # the set's sighting clock at its latest sighting
    count: int = 0  # its Space-Saving count while pending
    pending: bool = False


def _entry_size(item: FeedbackItem) -> int:
    id_size = sys.getsizeof(item.id) if item.id is not None else 0
    return sys.getsizeof(item.text) + sys.getsizeof(item.label) + id_size + _ENTRY_OVERHEAD


class FeedbackSet:
    """The bounded, de-duplicated set of feedback examples (not thread-safe; see the reader)."""

    def __init__(
        self,
        bounds: FeedbackBounds,
        *,
        holdout_fraction: float,
        protected: Iterable[str] = (),
        on_drop: DropCallback | None = None,
        seed: int = 0,
    ) -> None:
        self._bounds = bounds
        self._holdout_fraction = holdout_fraction
        self._protected = set(protected)
        self._on_drop = on_drop
        self._pending_cap = min(bounds.min_label_examples, bounds.max_per_label)
        self._pending_limit = _PENDING_PER_SLOT * bounds.max_labels
        self._pending_budget = bounds.max_bytes // _PENDING_SHARE
        self._rng = random.Random(seed)
        self._entries: dict[bytes, _Entry] = {}
        self._admitted: dict[str, _Label] = {}
        self._pending: dict[str, _Label] = {}
        self._bytes = 0
        self._pending_bytes = 0
        self._clock = 0
        self._fresh = 0

    def __len__(self) -> int:
        """Entries of admitted labels (what a run would train and evaluate on)."""
        return sum(len(state.keys) for state in self._admitted.values())

    @property
    def fresh(self) -> int:
        """Fresh examples admitted or relabelled and not yet used by a run (:meth:`consume_fresh`)."""
        return self._fresh

    @property
    def held_bytes(self) -> int:
        """Bytes of every held entry, pending labels included (at most ``max_bytes``)."""
        return self._bytes

    @property
    def pending_labels(self) -> int:
        return len(self._pending)

    def protects(self, label: str) -> bool:
        return label in self._protected

    def consume_fresh(self, count: int) -> None:
        """Forget ``count`` fresh examples (a retraining run has used them)."""
        self._fresh = max(self._fresh - count, 0)

    def counts(self) -> dict[str, int]:
        """Held examples per admitted label."""
        return {label: len(state.keys) for label, state in self._admitted.items()}

    def add(self, item: FeedbackItem, *, fresh: bool = True) -> AddOutcome:
        """Add ``item``; ``fresh=False`` for items an earlier run already had (restart rebuild)."""
        key = item.key
        previous = self._entries.get(key)
        if previous is not None:
            if previous.item == item:
                return "duplicate"
            self._discard(key, previous.item.label)
        label = item.label
        state = self._take_up(label)
        self._clock += 1
        state.touched = self._clock
        state.seen += 1
        was_admitted = label in self._admitted
        if not was_admitted:
            state.count += 1
        cap = self._bounds.max_per_label if was_admitted else self._pending_cap
        self._place(state, key, _Entry(item, _entry_size(item), fresh), cap)
        if state.pending:
            self._fit_pending(label)
            if label in self._pending:
                self._consider(label)
        self._fit_budget()
        if key not in self._entries:
            return "dropped"
        if label not in self._admitted:
            return "pending"
        if was_admitted and fresh:
            self._fresh += 1
        return "relabelled" if previous is not None else "added"

    def protect(self, labels: Iterable[str]) -> None:
        """Protect ``labels`` too (a newly promoted model's); open labels over the slots left go."""
        self._protected.update(labels)
        for label in [label for label in self._pending if label in self._protected]:
            self._admit(label)
        open_labels = sorted(self._open_labels(), key=self._weight)
        for label in open_labels[: max(len(open_labels) - self._open_slots(), 0)]:
            self._drop_label(label, "label_evicted")
        self._fit_budget()

    def snapshot(self) -> FeedbackSnapshot:
        """The admitted examples, split into train and held-out, in a stable (key) order."""
        train: list[Example] = []
        holdout: list[Example] = []
        for key in sorted(chain.from_iterable(state.keys for state in self._admitted.values())):
            item = self._entries[key].item
            side = holdout if is_held_out(item.split_key, self._holdout_fraction) else train
            side.append(Example(text=item.text, label=item.label))
        return FeedbackSnapshot(train=train, holdout=holdout)

    # ------------------------------------------------------------------ label slots

    def _take_up(self, label: str) -> _Label:
        """``label``'s state, made admitted (protected) or pending (any other) if new."""
        state = self._admitted.get(label) or self._pending.get(label)
        if state is not None:
            return state
        if label in self._protected:
            state = self._admitted[label] = _Label()
            return state
        state = _Label(pending=True)
        if len(self._pending) >= self._pending_limit:
            victim = self._lowest_pending()
            state.count = self._pending[victim].count
            self._drop_label(victim, "candidate_evicted")
        self._pending[label] = state
        return state

    def _lowest_pending(self, besides: str | None = None) -> str:
        """The pending label with the lowest count (the least recently seen among equals)."""
        return min(
            (name for name in self._pending if name != besides),
            key=lambda name: (self._pending[name].count, self._pending[name].touched),
        )

    def _fit_pending(self, label: str) -> None:
        """Make the pending labels fit their share of the bytes for ``label``, just seen.

        As in Space-Saving, ``label`` replaces the lowest others and takes over their count;
        it goes itself only when it alone is over the share.
        """
        state = self._pending[label]
        while self._pending_bytes > self._pending_budget and len(self._pending) > 1:
            victim = self._lowest_pending(besides=label)
            state.count = max(state.count, self._pending[victim].count + 1)
            self._drop_label(victim, "candidate_evicted")
        if self._pending_bytes > self._pending_budget:
            self._drop_label(label, "candidate_evicted")

    def _consider(self, label: str) -> None:
        """Admit pending ``label`` if it holds enough examples and a slot is free or weaker."""
        state = self._pending[label]
        if len(state.keys) < self._pending_cap:
            return
        open_labels = self._open_labels()
        if len(open_labels) >= self._open_slots():
            if not open_labels:
                return
            weakest = min(open_labels, key=self._weight)
            if self._admitted[weakest].seen >= state.seen:
                return
            log_event(
                logger,
                "feedback_label_evicted",
                logging.WARNING,
                label=weakest,
                seen=self._admitted[weakest].seen,
                by=label,
                by_seen=state.seen,
            )
            self._drop_label(weakest, "label_evicted")
        self._admit(label)

    def _admit(self, label: str) -> None:
        state = self._pending.pop(label)
        state.count, state.pending = 0, False
        self._pending_bytes -= state.size
        self._admitted[label] = state
        self._fresh += sum(1 for key in state.keys if self._entries[key].fresh)

    def _open_labels(self) -> list[str]:
        return [label for label in self._admitted if label not in self._protected]

    def _open_slots(self) -> int:
        return max(self._bounds.max_labels - len(self._protected), 0)

    def _weight(self, label: str) -> tuple[int, int]:
        state = self._admitted[label]
        return state.seen, state.touched

    # ------------------------------------------------------------------ entries

    def _place(self, state: _Label, key: bytes, entry: _Entry, cap: int) -> None:
        """Reservoir sampling of ``cap`` keys: room, or replace a random held key, or drop."""
        if len(state.keys) < cap:
            state.keys.append(key)
            self._hold(state, key, entry)
            return
        self._dropped("label_cap", 1)
        slot = self._rng.randrange(state.seen)
        if slot < cap:
            self._release(state, state.keys[slot])
            state.keys[slot] = key
            self._hold(state, key, entry)

    def _fit_budget(self) -> None:
        """Take random entries from the admitted label holding the most bytes until the set fits."""
        while self._bytes > self._bounds.max_bytes:
            label, state = max(self._admitted.items(), key=lambda pair: pair[1].size)
            slot = self._rng.randrange(len(state.keys))
            key = state.keys[slot]
            state.keys[slot] = state.keys[-1]
            state.keys.pop()
            self._release(state, key)
            self._dropped("byte_budget", 1)
            if not state.keys:
                self._forget(label)

    def _hold(self, state: _Label, key: bytes, entry: _Entry) -> None:
        self._entries[key] = entry
        state.size += entry.size
        self._bytes += entry.size
        if state.pending:
            self._pending_bytes += entry.size

    def _release(self, state: _Label, key: bytes) -> None:
        entry = self._entries.pop(key)
        state.size -= entry.size
        self._bytes -= entry.size
        if state.pending:
            self._pending_bytes -= entry.size

    def _discard(self, key: bytes, label: str) -> None:
        """Take one entry out (it is being relabelled); a label left empty goes."""
        state = self._admitted.get(label) or self._pending[label]
        state.keys.remove(key)
        self._release(state, key)
        if not state.keys:
            self._forget(label)

    def _drop_label(self, label: str, reason: FeedbackDropReason) -> None:
        state = self._admitted.pop(label, None) or self._pending.pop(label)
        for key in state.keys:
            self._release(state, key)
        self._dropped(reason, len(state.keys))

    def _forget(self, label: str) -> None:
        if self._admitted.pop(label, None) is None:
            del self._pending[label]

    def _dropped(self, reason: FeedbackDropReason, count: int) -> None:
        if self._on_drop is not None and count:
            self._on_drop(reason, count)


class FeedbackReader:
    """Keeps a :class:`FeedbackSet` equal to the feedback topics, read from their beginning.

    Runs on its own thread (:meth:`run` until :meth:`stop`). Records below ``baseline``
    (the offsets the last retraining run had read, from the manifest) rebuild the set
    without counting as fresh and without being dead-lettered again; records at or after
    it are fresh, and bad ones go to the dead-letter topic once. ``model_labels`` (the
    served model's) and ``feedback.allowed_labels`` are the set's protected labels.
    """

    def __init__(
        self,
        settings: Settings,
        producer: Producer,
        metrics: Metrics,
        *,
        baseline: dict[str, int] | None = None,
        model_labels: Iterable[str] = (),
    ) -> None:
        fb = settings.feedback
        for label in fb.allowed_labels:
            if checked_label(label, fb.max_label_chars) != label:
                raise ConfigError(
                    f"setting 'feedback.allowed_labels' (env STREAM_CLASSIFIER_FEEDBACK__ALLOWED_LABELS): "
                    f"{label!r} is not a usable label: at most feedback.max_label_chars={fb.max_label_chars} "
                    "printable characters, without leading or trailing spaces"
                )
        self._settings = settings
        self._producer = producer
        self._metrics = metrics
        self._baseline = dict(baseline or {})
        self._set = FeedbackSet(
            FeedbackBounds.of(fb),
            holdout_fraction=settings.retrain.holdout_fraction,
            protected=[*model_labels, *fb.allowed_labels],
            on_drop=self._count_drop,
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._positions: dict[str, int] = {}
        self._targets: dict[str, int] | None = None
        self._gauged: set[str] = set()
        self.caught_up = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Read until stopped; the first pass to the end offsets sets :attr:`caught_up`.

        Never returns before :meth:`stop`: a failure is logged, counted, kept in
        :attr:`error` and retried with a backoff that grows (see the module docstring).
        """
        backoff = Backoff("feedback_reader", min_s=_RETRY_MIN_S, max_s=_RETRY_MAX_S)
        while not self._stop.is_set():
            try:
                self._read(backoff)
            except Exception as exc:  # the reader outlives every failure, retrying
                self.error = exc
                self._metrics.feedback_reader_errors.labels(stage="read").inc()
                delay = backoff.failed(exc)
                log_event(
                    logger,
                    "feedback_reader_failed",
                    logging.ERROR,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=delay,
                    caught_up=self.caught_up.is_set(),
                    exc_info=exc,
                )
                self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()

    def _read(self, backoff: Backoff) -> None:
        """One reader from the topics' beginning, resuming after the records already taken."""
        reader = TopicReader(self._settings.kafka, self._settings.feedback.topics, start="beginning")
        try:
            if self._targets is None:
                self._targets = reader.end_offsets()
            while not self._stop.is_set():
                try:
                    records = reader.poll(0.5)
                except BrokerUnavailableError as exc:
                    self._metrics.feedback_reader_errors.labels(stage="read").inc()
                    delay = backoff.failed(exc)
                    log_event(
                        logger, "feedback_read_retry", logging.WARNING, error=str(exc), retry_in_s=delay
                    )
                    self._stop.wait(delay)
                    continue
                backoff.ok()
                self.error = None
                for record in records:
                    self._take_safely(record)
                if records:
                    self._update_gauges()
                self._advance(reader.positions())
        finally:
            reader.close()

    def _advance(self, positions: dict[str, int]) -> None:
        """Record how far the reading got (never backwards: a retry re-reads from the beginning)."""
        targets = self._targets or {}
        with self._lock:
            for name, offset in positions.items():
                self._positions[name] = max(self._positions.get(name, 0), offset)
            if self.caught_up.is_set() or any(self._positions.get(k, 0) < end for k, end in targets.items()):
                return
            examples, per_label = len(self._set), self._set.counts()
            pending, held = self._set.pending_labels, self._set.held_bytes
        self.caught_up.set()
        log_event(
            logger,
            "feedback_rebuilt",
            examples=examples,
            per_label=per_label,
            pending_labels=pending,
            held_bytes=held,
        )

    def _update_gauges(self) -> None:
        """Examples held per admitted label and the bytes held; a label let go reads 0 if protected."""
        with self._lock:
            counts = self._set.counts()
            held = self._set.held_bytes
            gone = {label: self._set.protects(label) for label in self._gauged - counts.keys()}
        gauge = self._metrics.feedback_examples
        for label, count in counts.items():
            gauge.labels(label=label).set(count)
        for label, protected in gone.items():
            if protected:
                gauge.labels(label=label).set(0)
            else:  # an evicted label's series goes with it, so the label count stays bounded
                gauge.remove(label)
                self._gauged.discard(label)
        self._gauged |= counts.keys()
        self._metrics.feedback_held_bytes.set(held)

    def _count_drop(self, reason: FeedbackDropReason, count: int) -> None:
        self._metrics.feedback_dropped.labels(reason=reason).inc(count)

    def _is_fresh(self, record: Record) -> bool:
        return record.offset >= self._baseline.get(offsets_key(record.topic, record.partition), 0)

    def _take_safely(self, record: Record) -> None:
        """Take ``record`` once, even across a reopen; an unexpected error rejects it alone.

        Such a record is dead-lettered as ``processing_failed`` with its coordinates only. If
        even that fails, the read loop's retry goes on after it: no record is taken twice.
        """
        name = offsets_key(record.topic, record.partition)
        with self._lock:
            if record.offset < self._positions.get(name, 0):
                return  # taken before the reader was reopened
        try:
            self._take(record)
        except Exception as exc:  # one record never stops the reader
            self._metrics.feedback_reader_errors.labels(stage="record").inc()
            detail = f"{type(exc).__name__}: {exc}"
            log_event(
                logger,
                "feedback_record_failed",
                logging.ERROR,
                source=source_id(record),
                error=detail,
                exc_info=exc,
            )
            if self._is_fresh(record):
                rejected = Rejected("processing_failed", detail)
                topic = self._settings.kafka.dead_letter_topic
                self._send(
                    minimal_dead_letter(record, CodecRejected(rejected.reason, detail), topic),
                    record,
                    rejected,
                )
        finally:
            with self._lock:
                self._positions[name] = max(self._positions.get(name, 0), record.offset + 1)

    def _take(self, record: Record) -> None:
        fresh = self._is_fresh(record)
        item = decode_feedback(record.value, self._settings.feedback)
        if isinstance(item, Rejected):
            if fresh:
                self._dead_letter(record, item)
            return
        with self._lock:
            self._set.add(item, fresh=fresh)
        self._metrics.feedback_received.inc()

    def _dead_letter(self, record: Record, rejected: Rejected) -> None:
        letter = encode_dead_letter(
            record,
            CodecRejected(rejected.reason, rejected.detail),
            self._settings.kafka.dead_letter_topic,
            self._settings.kafka.max_request_size,
        )
        self._send(letter, record, rejected)

    def _send(self, letter: OutgoingRecord, record: Record, rejected: Rejected) -> None:
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
            source=source_id(record),
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

    def protect(self, labels: Iterable[str]) -> None:
        """Give ``labels`` (a newly promoted model's) permanent slots."""
        with self._lock:
            self._set.protect(labels)
