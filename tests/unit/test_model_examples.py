"""Data files: JSONL and CSV readers, bad rows named by file and line, or skipped and counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_classifier.errors import DataError
from stream_classifier.model.examples import Example, cap_per_label, fingerprint, read_examples


def test_jsonl_reads_text_and_label_and_ignores_extra_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b", "label": "x", "id": 7}\n\n{"text": "c", "label": 3}\n', encoding="utf-8")
    result = read_examples(path)
    assert result.examples == [Example("a b", "x"), Example("c", "3")]
    assert result.skipped == 0


def test_csv_with_header_in_any_column_order(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('label,id,text\nspam,1,"buy, now"\nham,2,"multi\nline"\n', encoding="utf-8")
    assert read_examples(path).examples == [Example("buy, now", "spam"), Example("multi\nline", "ham")]


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('{"text": "ok", "label": "a"}\n{"text": "x", "label": "a"\n', 2, "invalid JSON"),
        ('{"text": "ok", "label": "a"}\n[1, 2]\n', 2, "not a JSON object"),
        ('{"text": "ok", "label": "a"}\n\n{"label": "a"}\n', 3, "'text' is missing"),
        ('{"text": "ok", "label": "a"}\n{"text": "  ", "label": "a"}\n', 2, "'text' is empty"),
        ('{"text": "ok", "label": null}\n', 1, "'label' is missing"),
    ],
)
def test_bad_jsonl_row_is_an_error_naming_file_and_line(
    tmp_path: Path, content: str, line: int, reason: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_examples(path)
    assert f"{path}:{line}: " in str(caught.value)
    assert reason in str(caught.value)
    assert "--skip-bad-rows" in str(caught.value)


def test_skip_bad_rows_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\nnot json\n{"text": ""}\n{"text": "b", "label": "c"}\n')
    result = read_examples(path, skip_bad_rows=True)
    assert result.examples == [Example("ok", "a"), Example("b", "c")]
    assert result.skipped == 2
    assert result.skipped_reasons[0].startswith(f"{path}:2: ")


def test_bad_csv_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nfine,a\n,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: 'text' is empty"):
        read_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("h.csv", "body,category\nx,y\n", "header must name 'text' and 'label'"),
        ("d.parquet", "x", "unknown data format"),
        ("e.jsonl", "\n\n", "no usable examples"),
        ("u.jsonl", b'{"text": "\xff", "label": "a"}\n', "not UTF-8"),
    ],
)
def test_unusable_files_are_clear_errors(
    tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        read_examples(tmp_path / "nope.jsonl")


def test_cap_per_label_keeps_the_latest_in_order() -> None:
    examples = [Example(f"t{i}", "a" if i % 3 else "b") for i in range(10)]
    kept = cap_per_label(examples, 2)
    assert kept == [Example("t6", "b"), Example("t7", "a"), Example("t8", "a"), Example("t9", "b")]


def test_fingerprint_depends_on_content_not_format() -> None:
    a = [Example("x", "1"), Example("y", "2")]
    assert fingerprint(a) == fingerprint(list(a))
    assert fingerprint(a)[0] == 2
    assert fingerprint(a)[1] != fingerprint([Example("x", "1"), Example("y", "3")])[1]
