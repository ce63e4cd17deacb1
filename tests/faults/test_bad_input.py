"""Bad input: hypothesis-generated garbage mixed with good messages. Nothing crashes, and
every input is accounted for exactly once: outputs + dead letters = inputs, offset by offset.

Generated: invalid UTF-8, invalid JSON, JSON that is not an object, wrong types for the
text, missing and empty (whitespace) text, arbitrary bytes, tombstones (null values), and
values from just over ``input.max_bytes`` up to about the broker's maximum request size.
Good messages carry arbitrary Unicode text.

Hostile classes besides: texts and ids written as JSON ``\\u`` escapes over the whole
code-point range (lone surrogates included), keys up to and over ``kafka.max_request_size``
(:data:`MAX_REQUEST`), header names and values (null values included), header names that
are not UTF-8 (a hostile producer, each in a batch of its own), and records whose key +
value + headers sit within a few bytes of :data:`MAX_REQUEST`. The property: the service
stays up, every record gets exactly one output or dead letter, and the group's offset
reaches the end. Each class's count is recorded in the report (``hostile_classes``).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from typing import Any

import confluent_kafka as ck
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import PREFIX, Metrics
from tests.faults.support import SCALES, Scale, message, model_for
from tests.fixtures.broker import TRANSPORTS, committed_offsets
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.service_support import TopicReader, running_service, service_settings, wait_until
from tests.integration.test_service_hostile import _RawHeaderKey

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MAX_BYTES = 4_096
BROKER_MAX_VALUE = 1_000_000  # under kafka-python's and the broker's 1 MiB request limit
MAX_REQUEST = 16_384  # the service's kafka.max_request_size here: keys and totals drawn around it
MINIMAL_LETTERS = {"output_too_large", "output_rejected", "unreadable_record"}  # no key or value

_texts = st.text(min_size=1, max_size=200)
_good = st.builds(lambda t: json.dumps({"text": t}).encode(), _texts.filter(lambda t: t.strip() != ""))
_invalid_utf8 = st.builds(
    lambda a, b: json.dumps({"text": a}).encode()[:-2] + b"\xff\xfe" + b.encode() + b'"}', _texts, _texts
)
_invalid_json = st.one_of(
    st.builds(lambda t: ('{"text": ' + json.dumps(t)).encode(), _texts),
    st.builds(lambda t: ("{" + t).encode(), _texts),
)
_not_object = st.builds(
    lambda v: json.dumps(v).encode(), st.one_of(st.integers(), st.lists(st.integers()), _texts, st.booleans())
)
_wrong_type = st.builds(
    lambda v: json.dumps({"text": v}).encode(),
    st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(_texts)),
)
_missing = st.builds(lambda t: json.dumps({"body": t}).encode(), _texts)
_empty = st.builds(lambda w: json.dumps({"text": w}).encode(), st.text(alphabet=" \t\n\r", max_size=5))
_raw = st.binary(max_size=300)
_tombstone = st.none()


def _escaped(code_points: list[int]) -> str:
    """JSON string content spelling every code point as ``\\u`` escapes (pairs above the BMP)."""
    out = []
    for cp in code_points:
        if cp > 0xFFFF:
            low = cp - 0x10000
            out.append(f"\\u{0xD800 + (low >> 10):04x}\\u{0xDC00 + (low & 0x3FF):04x}")
        else:
            out.append(f"\\u{cp:04x}")
    return "".join(out)


_code_points = st.lists(
    st.one_of(st.integers(0, 0x10FFFF), st.integers(0xD800, 0xDFFF)), min_size=1, max_size=40
)
_escaped_text = st.builds(lambda cps: ('{"text": "x' + _escaped(cps) + '"}').encode(), _code_points)
_escaped_id = st.builds(
    lambda cps, t: ('{"text": ' + json.dumps(t or "x") + ', "id": "' + _escaped(cps) + '"}').encode(),
    _code_points,
    _texts,
)
_odd_id = st.builds(
    lambda v: json.dumps({"text": "fine", "id": v}).encode(),
    st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.lists(st.integers()), st.text()),
)
_value = st.one_of(
    _good, _good, _invalid_utf8, _invalid_json, _not_object, _wrong_type, _missing, _empty, _raw,
    _escaped_text, _escaped_id, _odd_id,
)  # fmt: skip
_headers = st.lists(st.tuples(st.text(max_size=12), st.one_of(st.none(), st.binary(max_size=40))), max_size=4)
_message = st.one_of(
    st.tuples(st.one_of(st.none(), st.binary(max_size=16)), _value, _headers),
    st.tuples(st.binary(min_size=1, max_size=16), _tombstone, _headers),  # a tombstone needs a key
)

Input = tuple[bytes | None, bytes | None, list[tuple[Any, bytes | None]]]


def _sized(rng_size: int, key_size: int, header_size: int) -> Input:
    """A good message whose key + value + one header total ``rng_size`` bytes."""
    key = b"k" * key_size
    headers: list[tuple[Any, bytes | None]] = [("h", b"v" * header_size)]
    body = b'{"text": "' + b"x" * max(1, rng_size - key_size - header_size - 1 - 12) + b'"}'
    return key, body, headers


def edge_inputs() -> dict[str, list[Input]]:
    """The classes drawn around the limits, by name: keys up to and over MAX_REQUEST, totals
    at it, header names that are not UTF-8."""
    good = b'{"text": "fine text"}'
    return {
        "key_near_limit": [(b"k" * size, good, []) for size in (MAX_REQUEST // 2, MAX_REQUEST - 64)],
        "key_over_limit": [(b"k" * n, good, []) for n in (MAX_REQUEST, MAX_REQUEST + 1, 2 * MAX_REQUEST)],
        "total_at_limit": [
            _sized(MAX_REQUEST + delta, 200, 100) for delta in (-300, -100, -1, 0, 1, 100)
        ],
        "raw_header_name": [
            (None, good, [(_RawHeaderKey("x"), b"v")]),
            (b"k", None, [(_RawHeaderKey("y"), b"")]),  # kafka-python writes no null values
        ],
    }  # fmt: skip


def hostile_class(item: Input) -> str:
    """The class an input was drawn from, for the report's counts."""
    key, value, headers = item
    if any(isinstance(name, _RawHeaderKey) for name, _ in headers):
        return "raw_header_name"
    if len(key or b"") >= MAX_REQUEST:
        return "key_over_limit"
    if (
        len(key or b"") + len(value or b"") + sum(len(n) + len(v or b"") for n, v in headers)
        > MAX_REQUEST - 400
    ):
        return "near_or_over_limit"
    if value is None:
        return "tombstone"
    if b"\\u" in value:
        return "json_escapes"
    if any(v is None for _, v in headers):
        return "null_header_value"
    if headers:
        return "headers"
    return "other"


def generate_inputs(count: int) -> list[Input]:
    """About ``count`` (key, value, headers) drawn by hypothesis, plus the oversized values and
    the classes at the limits (:func:`edge_inputs`)."""
    drawn: list[Input] = []

    @settings(
        max_examples=max(1, count // 10),
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(_message, min_size=1, max_size=20))
    def collect(batch: list[Input]) -> None:
        drawn.extend(batch)

    while len(drawn) < count:
        collect()
    big = [MAX_BYTES + 1, 64 * 1024, 512 * 1024, BROKER_MAX_VALUE]
    drawn.extend((b"big", b'{"text": "' + b"x" * (size - 12) + b'"}', []) for size in big)
    for items in edge_inputs().values():
        drawn.extend(items)
    return drawn


def with_ordinary_messages(drawn: list[Input], count: int) -> list[Input]:
    """``drawn`` interleaved one for one with ``count`` ordinary good messages (soak mode)."""
    ordinary: list[Input] = [(None, message(i), []) for i in range(count)]
    return [pair for pairs in itertools.zip_longest(drawn, ordinary) for pair in pairs if pair is not None]


def output_rate(outputs: list[Any]) -> float:
    """Outputs per second between the first and the last output's timestamp (start-up excluded)."""
    stamps = [r.timestamp for r in outputs]
    return len(outputs) / max((max(stamps) - min(stamps)) / 1000, 1e-3)


def classify_all(
    broker: str,
    topic_factory,
    kafka_settings,
    runtime: ModelRuntime,
    inputs: list[Input],
) -> tuple[list[Any], list[Any], Metrics, str, str]:
    """Run ``inputs`` through the service: (outputs, dead letters, metrics, group, topic).

    A record with a non-UTF-8 header name goes in a batch of its own (flushed before and
    after), so that only it is unreadable to kafka-python; the offsets follow ``inputs``."""
    source, out, dlq = topic_factory("in"), topic_factory("out"), topic_factory("dlq")
    # librdkafka writes null header values (kafka-python refuses them); kafka-python writes the
    # non-UTF-8 header names. One record per batch keeps Tansu's end offsets right.
    producer = ck.Producer(
        {"bootstrap.servers": broker, "batch.num.messages": 1, "message.max.bytes": 2 * BROKER_MAX_VALUE}
    )
    raw = KafkaProducer(bootstrap_servers=broker, max_request_size=2 * BROKER_MAX_VALUE)
    for key, value, headers in inputs:
        if any(isinstance(name, _RawHeaderKey) for name, _ in headers):
            assert producer.flush(120) == 0
            raw.send(source, key=key, value=value, headers=headers, partition=0)
            raw.flush(timeout=120)
        else:
            producer.produce(source, value, key, headers=headers or None, partition=0)
            producer.poll(0)
    assert producer.flush(120) == 0
    raw.close()

    kafka = kafka_settings(
        input_topics=[source], output_topic=out, dead_letter_topic=dlq, max_request_size=MAX_REQUEST
    )
    settings_ = service_settings(kafka, input={"max_bytes": MAX_BYTES})
    outputs_reader, letters_reader = TopicReader(broker, out), TopicReader(broker, dlq)
    try:
        with running_service(settings_, runtime) as service:
            outputs_reader.wait_for(
                lambda _: len(outputs_reader.records) + len(letters_reader.read()) >= len(inputs),
                600,
                "an output or dead letter for every input",
            )
            wait_until(
                lambda: committed_offsets(broker, kafka.group_id, source).get(0) == len(inputs),
                120,
                "the group's offset at the end",
            )
        return outputs_reader.read(1.0), letters_reader.read(1.0), service.metrics, kafka.group_id, source
    finally:
        outputs_reader.close()
        letters_reader.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("scale", SCALES)
def test_fuzzed_input_everything_accounted_for(
    any_broker: BrokerTarget, request: pytest.FixtureRequest, scale: Scale, transport: str
) -> None:
    """On both brokers and both transports."""
    broker, topic_factory, kafka_settings = any_broker.bootstrap, any_broker.topic, any_broker.settings
    runtime = ModelRuntime.load(model_for(scale, request), device="cpu", precision="fp32")
    inputs = generate_inputs(scale.bad_inputs if transport == "kafka-python" else scale.bad_inputs // 4)
    if scale.real_model:  # soak: as many ordinary messages as drawn ones, for the throughput ratio
        inputs = with_ordinary_messages(inputs, len(inputs))
    outputs, letters, metrics, _, _ = classify_all(broker, topic_factory, kafka_settings, runtime, inputs)

    output_offsets = [json.loads(r.value)["source"]["offset"] for r in outputs]
    letter_offsets = [int(dict(r.headers)["source.offset"]) for r in letters]
    assert sorted(output_offsets + letter_offsets) == list(range(len(inputs)))  # each exactly once
    reasons = Counter(dict(r.headers)["error"].decode() for r in letters)
    for reason, count in reasons.items():
        assert metrics.registry.get_sample_value(f"{PREFIX}_dead_letters_total", {"reason": reason}) == count
    for offset, record in zip(letter_offsets, letters, strict=True):
        key, value, _ = inputs[offset]
        headers = dict(record.headers)
        if headers["error"].decode() in MINIMAL_LETTERS:  # coordinates and the reason only
            continue
        assert record.key == key
        if headers.get("truncated") != b"true":
            assert record.value == value
    assert reasons["too_large"] >= 4 and reasons["null_value"] >= 1 and len(outputs) >= 1
    assert reasons["output_too_large"] >= len(edge_inputs()["key_over_limit"])
    classes = Counter(hostile_class(item) for item in inputs)
    request.node.user_properties.append(("inputs", len(inputs)))
    request.node.user_properties.append(("hostile_classes", dict(classes)))
    request.node.user_properties.append(("dead_letter_reasons", dict(reasons)))
    sys.stderr.write(
        f"fuzz ({transport}): {len(inputs)} inputs; classes {dict(classes)}; dead letters {dict(reasons)}\n"
    )
    if scale.real_model:  # soak: good-message throughput with the garbage vs without it (recorded only)
        good = [inputs[offset] for offset in sorted(output_offsets)]
        clean, *_ = classify_all(broker, topic_factory, kafka_settings, runtime, good)
        mixed_rate, clean_rate = output_rate(outputs), output_rate(clean)
        ratio = mixed_rate / clean_rate
        request.node.user_properties.append(("good_throughput_vs_clean", round(ratio, 3)))
        sys.stderr.write(
            f"fuzz soak ({transport}): {len(good)} good of {len(inputs)} inputs, "
            f"{len(inputs) - len(good)} dead letters; good msg/s {mixed_rate:.1f} mixed, "
            f"{clean_rate:.1f} clean: ratio {ratio:.3f}\n"
        )
