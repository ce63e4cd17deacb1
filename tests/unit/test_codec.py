"""The codec: every input either decodes or becomes a dead letter with a known reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_classifier.config import InputSettings, OutputSettings
from stream_classifier.ops.metrics import DEAD_LETTER_REASONS, OUTPUT_REDUCED_REASONS
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


def encoder(
    decisions: bool = False, max_request_size: int = 1_048_576, **output: object
) -> codec.OutputEncoder:
    return codec.OutputEncoder(
        OutputSettings.model_validate(output), decisions=decisions, max_request_size=max_request_size
    )


def encode(
    enc: codec.OutputEncoder, rec: Record, decoded: Decoded, *, label: str = "pos", abstained: bool = False
) -> tuple[codec.OutgoingRecord, str | None]:
    rows, _ = codec.published_rows(np.array([[0.25, 0.7500001]], dtype=np.float32))
    return enc.encode(
        rec,
        decoded,
        labels=["neg", "pos"],
        row=rows[0],
        label=label,
        top_label="pos",
        abstained=abstained,
        model_version="v1",
        topic="out",
    )


def test_plain_prediction_encoding_is_todays_output() -> None:
    out, reduced = encode(encoder(), record(b"{}", headers=(("trace", b"t"),)), Decoded("hi", "a-1"))
    body = json.loads(out.value or b"")
    assert list(body) == ["id", "label", "probabilities", "model_version", "source"]
    assert body["id"] == "a-1" and body["label"] == "pos"
    assert body["model_version"] == "v1"
    assert body["source"] == {"topic": "in", "partition": 2, "offset": 17}
    assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-9
    assert body["probabilities"]["pos"] == pytest.approx(0.75, abs=1e-6)
    assert out.topic == "out" and out.key == b"k" and out.timestamp_ms is None and reduced is None
    assert out.headers == ((codec.MODEL_VERSION_HEADER, b"v1"), (codec.LABEL_HEADER, b"pos"))


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


def test_decision_fields_come_with_decisions_on() -> None:
    out, _ = encode(encoder(decisions=True), record(b"{}"), Decoded("hi", 1), label="unknown", abstained=True)
    body = json.loads(out.value or b"")
    assert list(body) == ["id", "label", "top_label", "abstained", "probabilities", "model_version", "source"]
    assert (body["label"], body["top_label"], body["abstained"]) == ("unknown", "pos", True)
    assert dict(out.headers)[codec.LABEL_HEADER] == b"unknown"


def test_include_input_text_and_original() -> None:
    value = b'{"text": "hi", "id": "a", "user": {"n": 1}, "tags": ["x"]}'
    decoded = InputDecoder(InputSettings(), keep_original=True).decode(record(value))
    assert isinstance(decoded, Decoded) and decoded.original == json.loads(value)
    text_out, _ = encode(encoder(include_input="text"), record(value), decoded)
    assert json.loads(text_out.value or b"")["text"] == "hi"
    assert "input" not in json.loads(text_out.value or b"")
    original_out, reduced = encode(encoder(include_input="original"), record(value), decoded)
    body = json.loads(original_out.value or b"")
    assert body["input"] == {"text": "hi", "id": "a", "user": {"n": 1}, "tags": ["x"]} and reduced is None
    assert "text" not in body
    # Plain-text input: "original" carries the raw text.
    text_decoded = InputDecoder(InputSettings(format="text"), keep_original=True).decode(record(b"raw words"))
    assert isinstance(text_decoded, Decoded) and text_decoded.original is None
    raw_out, _ = encode(encoder(include_input="original"), record(b"raw words"), text_decoded)
    assert json.loads(raw_out.value or b"")["input"] == "raw words"


def test_the_decoder_keeps_the_object_only_when_asked() -> None:
    decoded = JSON.decode(record(b'{"text": "hi", "x": 1}'))
    assert isinstance(decoded, Decoded) and decoded.original is None


HEADERS = (
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", b"v=1"),
    ("tenant", b"acme"),
    ("label", b"forged"),
    ("empty", None),
)


@pytest.mark.parametrize(
    ("headers", "carried"),
    [
        ("none", ["traceparent", "tracestate"]),
        ("all", ["traceparent", "tracestate", "tenant", "empty"]),
        (["tenant"], ["traceparent", "tracestate", "tenant"]),
        ("tenant,label", ["traceparent", "tracestate", "tenant"]),  # never the service's own names
    ],
)
def test_headers_carried_in_each_mode(headers: object, carried: list[str]) -> None:
    out, reduced = encode(encoder(headers=headers), record(b"{}", headers=HEADERS), Decoded("hi", 1))
    names = [name for name, _ in out.headers]
    assert names[:2] == [codec.MODEL_VERSION_HEADER, codec.LABEL_HEADER]
    assert names[2:] == carried and reduced is None
    assert dict(out.headers)[codec.LABEL_HEADER] == b"pos"
    assert dict(out.headers).get("traceparent") == HEADERS[0][1]


def test_output_timestamp_input_or_produced() -> None:
    rec = record(b"{}")
    assert encode(encoder(timestamp="input"), rec, Decoded("hi", 1))[0].timestamp_ms == 1_700_000_000_000
    assert encode(encoder(timestamp="produced"), rec, Decoded("hi", 1))[0].timestamp_ms is None
    unknown = Record("in", 2, 17, b"k", b"{}", (), None)
    assert encode(encoder(timestamp="input"), unknown, Decoded("hi", 1))[0].timestamp_ms is None


def test_an_enriched_output_over_the_size_limit_falls_back_to_the_plain_one() -> None:
    big = json.dumps({"text": "hi", "blob": "x" * 4_000}).encode()
    decoded = InputDecoder(InputSettings(max_bytes=10_000), keep_original=True).decode(record(big))
    assert isinstance(decoded, Decoded)
    headers = (("traceparent", b"00-ab-cd-01"), ("tenant", b"t" * 3_000))
    enc = encoder(max_request_size=2_048, include_input="original", headers="all")
    out, reduced = encode(enc, record(big, headers=headers), decoded)
    assert reduced == codec.REDUCED_TOO_LARGE
    plain, _ = encode(encoder(), record(big, headers=headers), decoded)
    assert out == plain  # today's output, trace context kept
    assert dict(out.headers)["traceparent"] == b"00-ab-cd-01" and "tenant" not in dict(out.headers)
    assert codec.record_size(out.key, out.value, out.headers) <= 2_048
    # Just under the limit it is sent enriched.
    fits = encoder(max_request_size=10_000, include_input="original", headers="all")
    assert encode(fits, record(big, headers=headers), decoded)[1] is None


def test_an_input_that_is_not_strict_json_goes_out_plain_and_a_lone_surrogate_as_it_came() -> None:
    nan = InputDecoder(InputSettings(), keep_original=True).decode(record(b'{"text": "hi", "x": NaN}'))
    assert isinstance(nan, Decoded)
    out, reduced = encode(encoder(include_input="original"), record(b"{}"), nan)
    assert reduced == codec.REDUCED_UNENCODABLE and "input" not in json.loads(out.value or b"")
    assert b"NaN" not in (out.value or b"")
    value = b'{"text": "hi", "note": "\\ud800 lone"}'
    lone = InputDecoder(InputSettings(), keep_original=True).decode(record(value))
    assert isinstance(lone, Decoded)
    out, reduced = encode(encoder(include_input="original"), record(value), lone)
    assert reduced is None and b"\\ud800" in (out.value or b"")
    assert json.loads(out.value or b"")["input"]["note"] == "\ud800 lone"


def test_reduced_reasons_are_counted_reasons() -> None:
    assert set(codec.REDUCED_REASONS) == set(OUTPUT_REDUCED_REASONS)
