"""The codec: every input either decodes or becomes a dead letter with a known reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_classifier.config import InputSettings
from stream_classifier.ops.metrics import DEAD_LETTER_REASONS
from stream_classifier.stream import codec
from stream_classifier.stream.codec import Decoded, InputDecoder, Rejected
from stream_classifier.transport import Record


def record(
    value: bytes | None, *, key: bytes | None = b"k", headers: tuple[tuple[str, bytes], ...] = ()
) -> Record:
    return Record("in", 2, 17, key, value, headers, 1_700_000_000_000)


JSON = InputDecoder(InputSettings(max_bytes=100))
TEXT = InputDecoder(InputSettings(format="text", max_bytes=100))


def test_codec_reasons_are_counted_reasons() -> None:
    assert set(codec.CODEC_REASONS) | {codec.INFERENCE_FAILED} <= set(DEAD_LETTER_REASONS)


@pytest.mark.parametrize(
    ("decoder", "value", "reason"),
    [
        (JSON, None, "null_value"),
        (JSON, b"{" + b" " * 100 + b"}", "too_large"),
        (JSON, b'{"text": "caf\xe9"}', "invalid_utf8"),
        (JSON, b'{"text": ', "invalid_json"),
        (JSON, b'"just a string"', "not_an_object"),
        (JSON, b'["text"]', "not_an_object"),
        (JSON, b'{"body": "x"}', "missing_text"),
        (JSON, b'{"text": 3}', "text_not_string"),
        (JSON, b'{"text": null}', "text_not_string"),
        (JSON, b'{"text": " \\n\\t"}', "empty_text"),
        (TEXT, b"", "empty_text"),
        (TEXT, b"\xff\xfe", "invalid_utf8"),
        (TEXT, None, "null_value"),
        (TEXT, b"x" * 101, "too_large"),
    ],
)
def test_each_reason(decoder: InputDecoder, value: bytes | None, reason: str) -> None:
    result = decoder.decode(record(value))
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert result.message


def test_deep_nesting_is_invalid_json_not_a_crash() -> None:
    deep = InputDecoder(InputSettings(max_bytes=1_000_000))
    result = deep.decode(record(b"[" * 200_000 + b"]" * 200_000))
    assert isinstance(result, Rejected) and result.reason == "invalid_json"


def test_json_with_id_and_without() -> None:
    assert JSON.decode(record(b'{"text": "hello", "id": "a-1"}')) == Decoded("hello", "a-1")
    assert JSON.decode(record(b'{"text": "hello", "id": 7}')) == Decoded("hello", 7)
    assert JSON.decode(record(b'{"text": "hello"}')) == Decoded("hello", "in:2:17")
    assert JSON.decode(record(b'{"text": "hello", "id": true}')) == Decoded("hello", "in:2:17")


def test_custom_fields_and_text_format() -> None:
    custom = InputDecoder(InputSettings(text_field="body", id_field="uid"))
    assert custom.decode(record(b'{"body": "hi", "uid": "u"}')) == Decoded("hi", "u")
    assert TEXT.decode(record("naïve text".encode())) == Decoded("naïve text", "in:2:17")


@given(st.binary(max_size=200))
def test_no_bytes_make_the_decoder_raise(value: bytes) -> None:
    for decoder in (JSON, TEXT):
        result = decoder.decode(record(value))
        assert isinstance(result, Decoded) or result.reason in codec.CODEC_REASONS


def test_prediction_encoding() -> None:
    rows, best = codec.published_rows(np.array([[0.25, 0.7500001]], dtype=np.float32))
    out, label, confidence = codec.encode_prediction(
        record(b"{}"),
        id_="a-1",
        labels=["neg", "pos"],
        row=rows[0],
        best=best[0],
        model_version="v1",
        topic="out",
    )
    body = json.loads(out.value or b"")
    assert body["id"] == "a-1" and body["label"] == "pos" == label
    assert body["model_version"] == "v1"
    assert body["source"] == {"topic": "in", "partition": 2, "offset": 17}
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-9
    assert confidence == pytest.approx(0.75, abs=1e-6)
    assert out.topic == "out" and out.key == b"k"
    assert dict(out.headers)[codec.MODEL_VERSION_HEADER] == b"v1"


def test_published_rows_are_each_row_renormalised_in_float64() -> None:
    probabilities = np.array([[0.2, 0.3, 0.5000001], [0.9, 0.05, 0.05], [0.0, 0.0, 0.0]], dtype=np.float32)
    rows, best = codec.published_rows(probabilities)
    for row, original in zip(rows[:2], probabilities[:2], strict=True):
        expected = original.astype(np.float64) / original.astype(np.float64).sum()
        assert row == expected.tolist() and sum(row) == pytest.approx(1.0, abs=1e-12)
    assert best[:2] == [2, 0]
    assert all(math.isnan(v) for v in rows[2])  # a failed message's zero row: never published


def test_dead_letter_keeps_key_value_and_headers() -> None:
    original = record(b"\xffraw", key=b"key-1", headers=(("trace", b"t1"),))
    out = codec.encode_dead_letter(original, Rejected("invalid_utf8", "bad"), "dlq", 1_048_576)
    headers = dict(out.headers)
    assert (out.topic, out.key, out.value) == ("dlq", b"key-1", b"\xffraw")
    assert headers["trace"] == b"t1"
    assert headers["error"] == b"invalid_utf8" and headers["error.message"] == b"bad"
    assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == (
        b"in",
        b"2",
        b"17",
    )
    assert codec.TRUNCATED_HEADER not in headers


def test_oversized_dead_letter_is_truncated_to_fit() -> None:
    value = b"v" * 5_000
    out = codec.encode_dead_letter(record(value), Rejected("too_large", "big"), "dlq", 2_048)
    headers = dict(out.headers)
    assert headers["truncated"] == b"true" and headers["original.size"] == b"5000"
    assert out.value is not None and 0 < len(out.value) < 2_048 and value.startswith(out.value)
    size = len(out.value) + len(out.key or b"") + sum(len(k) + len(v) for k, v in out.headers)
    assert size < 2_048


def test_null_value_dead_letter_stays_null() -> None:
    out = codec.encode_dead_letter(record(None), Rejected("null_value", "tombstone"), "dlq", 2_048)
    assert out.value is None and out.key == b"k"
