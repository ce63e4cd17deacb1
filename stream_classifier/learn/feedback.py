"""Labelled feedback: decoding, and the reader that fills the bounded set (:mod:`.feedback_set`).

A feedback message is a JSON object ``{"text": str, "label": str, "id"?: str | int}``.
:func:`decode_feedback` turns its bytes into a :class:`FeedbackItem` or a
:class:`Rejected` carrying a dead-letter reason from
:data:`stream_classifier.ops.metrics.DEAD_LETTER_REASONS`; it never raises. Every string
of an item encodes as UTF-8 (JSON ``\\u`` escapes can carry lone surrogates: such texts,
labels and ids are rejected), and a label is at most ``feedback.max_label_chars``
printable characters (no control, format or separator character but the space).

:class:`FeedbackReader` invariants: no record and no failure that may pass ends its thread.
A record that raises unexpectedly is dead-lettered as ``processing_failed`` (coordinates and
reason only) and counted; a failure of the read loop is logged, counted and retried with a
backoff that grows, resuming after the last record taken, and :attr:`FeedbackReader.error`
says what failed until a poll succeeds again. A failure no retry can cure (a
:class:`~stream_classifier.errors.TransportError` such as a topic the ACLs deny, whose
message names the topic, or a :class:`~stream_classifier.errors.ConfigError`) ends the
thread: it is logged once as ``feedback_reader_stopped`` and stays in ``error``, so every
retraining request is answered ``failed`` with it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from stream_classifier.config import FeedbackSettings, Settings
from stream_classifier.errors import BrokerUnavailableError, ConfigError, RecordRejectedError, TransportError
from stream_classifier.learn.feedback_set import FeedbackBounds, FeedbackItem, FeedbackSet, FeedbackSnapshot
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import DeadLetterReason, FeedbackDropReason, Metrics
from stream_classifier.stream.backoff import Backoff
from stream_classifier.stream.codec import OutgoingRecord, encode_dead_letter, minimal_dead_letter, source_id
from stream_classifier.stream.codec import Rejected as CodecRejected
from stream_classifier.transport import Producer, Record, make_reader, offsets_key

logger = logging.getLogger(__name__)

_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 30.0


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

        Returns only after :meth:`stop`, or on a failure no retry can cure; any other failure
        is logged, counted, kept in :attr:`error` and retried with a backoff that grows (see
        the module docstring).
        """
        backoff = Backoff("feedback_reader", min_s=_RETRY_MIN_S, max_s=_RETRY_MAX_S)
        while not self._stop.is_set():
            try:
                self._read(backoff)
            except (TransportError, ConfigError) as exc:
                if isinstance(exc, RecordRejectedError):  # one record refused: the loop goes on
                    self._failed(exc, backoff)
                    continue
                self.error = exc
                self._metrics.feedback_reader_errors.labels(stage="read").inc()
                log_event(
                    logger,
                    "feedback_reader_stopped",
                    logging.ERROR,
                    error=f"{type(exc).__name__}: {exc}",
                    topics=list(self._settings.feedback.topics),
                )
                return
            except Exception as exc:  # the reader outlives every other failure, retrying
                self._failed(exc, backoff)

    def _failed(self, exc: Exception, backoff: Backoff) -> None:
        """One failure of the read loop that may pass: kept, counted, logged, waited out."""
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
        reader = make_reader(self._settings.kafka, self._settings.feedback.topics, start="beginning")
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
