"""Message bytes <-> the service's values: input decoding, output and dead-letter encoding.

Invariants:

- Nothing raises past this module for any input record. :meth:`InputDecoder.decode` returns
  either a :class:`Decoded` text or a :class:`Rejected` reason from :data:`CODEC_REASONS`
  (each one of ``ops.metrics.DEAD_LETTER_REASONS``).
- Every string a :class:`Decoded` carries encodes as UTF-8 (JSON ``\\u`` escapes can carry
  lone surrogates; such texts and ids are rejected), so its output always encodes.
- No record this module builds is larger than the producer's ``max_request_size``:
  :func:`record_size` bounds a record as the producer counts it; a dead letter keeps the
  input's key, headers and value, cutting the value to fit (marked ``truncated``), and
  falls back to :func:`minimal_dead_letter` (coordinates and reason only) when the key and
  headers alone do not fit. An enriched output (``output.include_input``, carried headers)
  that would not fit, or whose input cannot be written as JSON (a NaN in it), is replaced
  by the plain output, and :meth:`OutputEncoder.encode` says why (:data:`REDUCED_REASONS`);
  it is never dropped.
- Outputs are strict JSON (``allow_nan=False``) in UTF-8; an input object holding a lone
  surrogate escape is written with ASCII escapes, as it came.

This is the per-message hot path: one pass of checks per input (one ``json.loads``; the
object is kept for ``include_input: original``, never parsed again), one ``json.dumps`` per
output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_classifier.config import InputSettings, OutputSettings
from stream_classifier.transport.base import Headers, Record

NULL_VALUE = "null_value"
TOO_LARGE = "too_large"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
TEXT_NOT_STRING = "text_not_string"
EMPTY_TEXT = "empty_text"
INVALID_TEXT = "invalid_text"
INVALID_ID = "invalid_id"
INFERENCE_FAILED = "inference_failed"
OUTPUT_TOO_LARGE = "output_too_large"
OUTPUT_REJECTED = "output_rejected"
UNREADABLE_RECORD = "unreadable_record"
CODEC_REASONS = (
    NULL_VALUE,
    TOO_LARGE,
    INVALID_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_TEXT,
    TEXT_NOT_STRING,
    EMPTY_TEXT,
    INVALID_TEXT,
    INVALID_ID,
)

# Output header names: the service's own, and the W3C trace context carried whenever present.
MODEL_VERSION_HEADER = "model.version"
LABEL_HEADER = "label"
DECIDED_BY_HEADER = "model.decided_by"  # only from a runtime that says (model.cascade)
SERVICE_HEADERS = frozenset((MODEL_VERSION_HEADER, LABEL_HEADER, DECIDED_BY_HEADER))
TRACE_HEADERS = frozenset(("traceparent", "tracestate"))
# Why an output went out plain instead of enriched.
REDUCED_TOO_LARGE = "too_large"
REDUCED_UNENCODABLE = "unencodable"
REDUCED_REASONS = (REDUCED_TOO_LARGE, REDUCED_UNENCODABLE)
# Dead-letter header names.
ERROR_HEADER = "error"
ERROR_MESSAGE_HEADER = "error.message"
TRUNCATED_HEADER = "truncated"
ORIGINAL_SIZE_HEADER = "original.size"

# Record-batch header (61 bytes) + one record's worst-case varints and attributes, rounded up.
_RECORD_OVERHEAD = 128
_HEADER_OVERHEAD = 10
_MINIMAL_MESSAGE_CHARS = 200


@dataclass(frozen=True, slots=True)
class Decoded:
    text: str
    id: str | int
    original: dict[str, Any] | None = None  # the input's JSON object, kept only when asked for


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    """A record to produce."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int | None = None  # None: the time it is produced


def source_id(record: Record) -> str:
    return f"{record.topic}:{record.partition}:{record.offset}"


class InputDecoder:
    """Turns input record values into texts, according to ``input.*`` settings."""

    def __init__(self, settings: InputSettings, *, keep_original: bool = False) -> None:
        self._json = settings.format == "json"
        self._keep_original = keep_original
        self._text_field = settings.text_field
        self._id_field = settings.id_field
        self._max_bytes = settings.max_bytes

    def decode(self, record: Record) -> Decoded | Rejected:
        value = record.value
        if value is None:
            return Rejected(NULL_VALUE, "the message value is null (a tombstone)")
        if len(value) > self._max_bytes:
            return Rejected(
                TOO_LARGE, f"the value is {len(value)} bytes; input.max_bytes is {self._max_bytes}"
            )
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected(INVALID_UTF8, f"the value is not UTF-8: {exc.reason} at byte {exc.start}")
        if not self._json:
            return self._checked(text, source_id(record))
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return Rejected(INVALID_JSON, f"the value is not JSON: {str(exc)[:200]}")
        if not isinstance(obj, dict):
            return Rejected(NOT_AN_OBJECT, f"the value is a JSON {type(obj).__name__}, not an object")
        if self._text_field not in obj:
            return Rejected(MISSING_TEXT, f"the object has no {self._text_field!r} field")
        text = obj[self._text_field]
        if not isinstance(text, str):
            return Rejected(
                TEXT_NOT_STRING, f"field {self._text_field!r} is a JSON {type(text).__name__}, not a string"
            )
        given = obj.get(self._id_field)
        id_: str | int = (
            given
            if isinstance(given, str | int) and not isinstance(given, bool) and given != ""
            else source_id(record)
        )
        if b"\\u" in value:  # only a JSON escape can put a lone surrogate into a str
            if not _encodable(text):
                return Rejected(INVALID_TEXT, f"field {self._text_field!r} holds a lone surrogate escape")
            if isinstance(id_, str) and not _encodable(id_):
                return Rejected(INVALID_ID, f"field {self._id_field!r} holds a lone surrogate escape")
        return self._checked(text, id_, obj if self._keep_original else None)

    def _checked(
        self, text: str, id_: str | int, original: dict[str, Any] | None = None
    ) -> Decoded | Rejected:
        if not text.strip():
            return Rejected(EMPTY_TEXT, "the text is empty or only whitespace")
        return Decoded(text, id_, original)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def published_rows(probabilities: np.ndarray) -> tuple[list[list[float]], list[int]]:
    """A batch's probability rows as published, and each row's argmax.

    Each row is renormalised so that the published values sum to 1 in float64. One numpy
    pass per batch: per-message numpy calls cost the serving I/O thread more than the JSON
    around them. A row summing to 0 (a message that failed, never published) becomes NaN.
    """
    rows = probabilities.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows /= rows.sum(axis=1, keepdims=True)
    best: list[int] = rows.argmax(axis=1).tolist()
    values: list[list[float]] = rows.tolist()
    return values, best


class OutputEncoder:
    """Encodes predictions by ``output.*``: the plain output, or the enriched one when it fits.

    The plain output is ``id``, ``label``, (with decisions on) ``top_label`` and
    ``abstained``, ``probabilities``, ``model_version``, (when the runtime says which model
    decided: ``model.cascade``) ``decided_by``, ``source``; headers ``model.version`` and
    ``label`` (and ``model.decided_by`` with ``decided_by``), plus the input's W3C trace
    headers. Enriched: ``text`` or ``input`` besides, and the input headers ``output.headers``
    names (never one of the service's own names: those win).
    """

    def __init__(self, output: OutputSettings, *, decisions: bool, max_request_size: int) -> None:
        self._decisions = decisions
        self._include = output.include_input
        self._mode = output.header_mode
        self._names = frozenset(output.headers) - SERVICE_HEADERS | TRACE_HEADERS
        self._input_timestamp = output.timestamp == "input"
        self._max_request_size = max_request_size
        self._enriched = self._include != "none" or self._mode != "none"

    def encode(
        self,
        record: Record,
        decoded: Decoded,
        *,
        labels: Sequence[str],
        row: Sequence[float],
        label: str,
        top_label: str,
        abstained: bool,
        model_version: str,
        topic: str,
        decided_by: str | None = None,
    ) -> tuple[OutgoingRecord, str | None]:
        """The output for ``record``, and why it is plain when enrichment was asked (else None).

        ``row`` is this record's from :func:`published_rows`, in ``labels`` order. Raises
        ValueError when even the plain output is not JSON (a non-finite probability).
        """
        payload: dict[str, Any] = {"id": decoded.id, "label": label}
        if self._decisions:
            payload["top_label"] = top_label
            payload["abstained"] = abstained
        payload["probabilities"] = dict(zip(labels, row, strict=True))
        payload["model_version"] = model_version
        if decided_by is not None:
            payload["decided_by"] = decided_by
        payload["source"] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        own: Headers = (
            (MODEL_VERSION_HEADER, model_version.encode("utf-8")),
            (LABEL_HEADER, label.encode("utf-8")),
        )
        if decided_by is not None:
            own = (*own, (DECIDED_BY_HEADER, decided_by.encode("utf-8")))
        stamp = record.timestamp_ms if self._input_timestamp and (record.timestamp_ms or 0) > 0 else None
        reduced: str | None = None
        if self._enriched:
            enriched = dict(payload)
            if self._include == "text":
                enriched["text"] = decoded.text
            elif self._include == "original":
                enriched["input"] = decoded.original if decoded.original is not None else decoded.text
            headers = (*own, *self._carried(record.headers))
            try:
                value = _dumps(enriched)
            except ValueError:  # a NaN or an infinity in the input object
                reduced = REDUCED_UNENCODABLE
            else:
                if record_size(record.key, value, headers) <= self._max_request_size:
                    return OutgoingRecord(topic, value, record.key, headers, stamp), None
                reduced = REDUCED_TOO_LARGE
        value = _dumps(payload)
        trace = tuple(h for h in record.headers if h[0] in TRACE_HEADERS) if record.headers else ()
        if trace and record_size(record.key, value, (*own, *trace)) > self._max_request_size:
            trace, reduced = (), REDUCED_TOO_LARGE  # trace headers too large to carry
        return OutgoingRecord(topic, value, record.key, (*own, *trace), stamp), reduced

    def _carried(self, headers: Headers) -> Headers:
        if not headers:
            return ()
        if self._mode == "all":
            return tuple(h for h in headers if h[0] not in SERVICE_HEADERS)
        names = self._names if self._mode == "names" else TRACE_HEADERS
        return tuple(h for h in headers if h[0] in names)


def _dumps(payload: dict[str, Any]) -> bytes:
    """Strict JSON in UTF-8; ValueError on a NaN or an infinity."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a \u escape) in the input object
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")


def encode_dead_letter(
    record: Record, rejected: Rejected, topic: str, max_request_size: int
) -> OutgoingRecord:
    """The dead letter for ``record``: its key, value and headers, plus the error headers.

    When the result would exceed ``max_request_size``, the value keeps its first bytes that
    fit, and headers ``truncated: true`` and ``original.size: <bytes>`` say so; when even the
    key and headers do not fit, it is :func:`minimal_dead_letter`.
    """
    error_headers = _error_headers(record, rejected)
    headers: Headers = (*record.headers, *error_headers)
    # A record needs a key or a value: a keyless tombstone's dead letter has an empty value.
    value = b"" if record.value is None and record.key is None else record.value
    if record_size(record.key, value, headers) <= max_request_size:
        return OutgoingRecord(topic, value, record.key, headers)
    if value is not None:
        headers = (
            *headers,
            (TRUNCATED_HEADER, b"true"),
            (ORIGINAL_SIZE_HEADER, str(len(value)).encode()),
        )
        room = max_request_size - record_size(record.key, b"", headers)
        if room >= 0:
            return OutgoingRecord(topic, value[:room], record.key, headers)
    return minimal_dead_letter(record, rejected, topic)


def minimal_dead_letter(record: Record, rejected: Rejected, topic: str) -> OutgoingRecord:
    """A dead letter of the source coordinates and the reason only: no key, no input headers,
    and as value a small JSON object with the reason and the coordinates.

    The last resort for an input whose full dead letter cannot be produced; a few hundred
    bytes at most (the error message is cut to :data:`_MINIMAL_MESSAGE_CHARS`).
    """
    short = Rejected(rejected.reason, rejected.message[:_MINIMAL_MESSAGE_CHARS])
    value = json.dumps(
        {
            "error": short.reason,
            "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
        },
        separators=(",", ":"),
    ).encode()
    return OutgoingRecord(topic, value, None, _error_headers(record, short))


def _error_headers(record: Record, rejected: Rejected) -> Headers:
    return (
        (ERROR_HEADER, rejected.reason.encode()),
        (ERROR_MESSAGE_HEADER, rejected.message.encode("utf-8", "replace")),
        ("source.topic", record.topic.encode("utf-8", "replace")),
        ("source.partition", str(record.partition).encode()),
        ("source.offset", str(record.offset).encode()),
    )


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper bound of a record's size as the producer checks it against ``max_request_size``."""
    return (
        _RECORD_OVERHEAD
        + len(key or b"")
        + len(value or b"")
        + sum(
            len(name.encode("utf-8", "replace")) + len(data or b"") + _HEADER_OVERHEAD
            for name, data in headers
        )
    )
