"""Labelled examples and the JSONL / CSV files that hold them.

A data file is either JSON Lines (one object per line with string ``text`` and ``label``;
extra fields are ignored) or CSV whose header names ``text`` and ``label`` columns. The
format is chosen by the file extension (``.jsonl``/``.json``/``.ndjson`` or ``.csv``/``.tsv``).

Invariant: a bad row is either reported as a :class:`DataError` naming the file and the
line, or, with ``skip_bad_rows``, skipped and counted in :attr:`ReadResult.skipped`; it
never raises anything else.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stream_classifier.errors import DataError

_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_CSV_SUFFIXES = {".csv", ".tsv"}


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass(frozen=True)
class ReadResult:
    """The examples of a file, and how many bad rows were skipped (with the first reasons)."""

    examples: list[Example]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


class _BadRowError(ValueError):
    """A row that is not a usable example; the message says why."""


def _example(text: object, label: object) -> Example:
    if not isinstance(text, str):
        raise _BadRowError("'text' is missing or not a string")
    if not text.strip():
        raise _BadRowError("'text' is empty")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise _BadRowError("'label' is missing or not a string")
    label_text = str(label).strip()
    if not label_text:
        raise _BadRowError("'label' is empty")
    return Example(text=text, label=label_text)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Example | _BadRowError]]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, _BadRowError(f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                yield line_no, _BadRowError("not a JSON object")
                continue
            try:
                yield line_no, _example(row.get("text"), row.get("label"))
            except _BadRowError as bad:
                yield line_no, bad


def _csv_rows(path: Path) -> Iterator[tuple[int, Example | _BadRowError]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = [name.strip().lower() for name in (reader.fieldnames or [])]
        if "text" not in header or "label" not in header:
            raise DataError(
                f"{path}:1: the CSV header must name 'text' and 'label' columns (found {header or 'none'})"
            )
        reader.fieldnames = header
        for row in reader:
            # line_num is the physical line where this record ended (quoted fields may span lines).
            try:
                yield reader.line_num, _example(row.get("text"), row.get("label"))
            except _BadRowError as bad:
                yield reader.line_num, bad


def read_examples(path: Path | str, *, skip_bad_rows: bool = False) -> ReadResult:
    """Read the labelled examples of a JSONL or CSV file.

    Raises :class:`DataError` for an unreadable or empty file, an unknown format, or (without
    ``skip_bad_rows``) the first bad row, naming ``file:line``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        rows = _jsonl_rows(path)
    elif suffix in _CSV_SUFFIXES:
        rows = _csv_rows(path)
    else:
        raise DataError(
            f"{path}: unknown data format {suffix!r}; use .jsonl or .csv (with a text,label header)"
        )
    examples: list[Example] = []
    skipped = 0
    reasons: list[str] = []
    try:
        for line_no, item in rows:
            if isinstance(item, Example):
                examples.append(item)
                continue
            if not skip_bad_rows:
                raise DataError(f"{path}:{line_no}: {item} (fix the row, or pass --skip-bad-rows)")
            skipped += 1
            if len(reasons) < 10:
                reasons.append(f"{path}:{line_no}: {item}")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not examples:
        raise DataError(f"{path}: no usable examples ({skipped} bad rows skipped)")
    return ReadResult(examples=examples, skipped=skipped, skipped_reasons=reasons)


def fingerprint(examples: Iterable[Example]) -> tuple[int, str]:
    """Count and sha256 of the examples, independent of file format (order-sensitive)."""
    digest = hashlib.sha256()
    count = 0
    for example in examples:
        digest.update(json.dumps([example.text, example.label], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
        count += 1
    return count, digest.hexdigest()


def cap_per_label(examples: Iterable[Example], max_per_label: int) -> list[Example]:
    """Keep at most ``max_per_label`` examples of each label: the most recent ones, in order."""
    kept: dict[str, list[Example]] = {}
    ordered = list(examples)
    for example in reversed(ordered):
        bucket = kept.setdefault(example.label, [])
        if len(bucket) < max_per_label:
            bucket.append(example)
    keep = {id(e) for bucket in kept.values() for e in bucket}
    return [e for e in ordered if id(e) in keep]
