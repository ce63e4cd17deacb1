"""Bad input: hypothesis-generated garbage mixed with good messages. Nothing crashes, and
every input is accounted for exactly once: outputs + dead letters = inputs, offset by offset.

Generated: invalid UTF-8, invalid JSON, JSON that is not an object, wrong types for the
text, missing and empty (whitespace) text, arbitrary bytes, tombstones (null values), and
values from just over ``input.max_bytes`` up to about the broker's maximum request size.
Good messages carry arbitrary Unicode text.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from tests.faults.support import SCALES, Scale, message, model_for
from tests.fixtures.broker import TRANSPORTS
from tests.integration.service_support import TopicReader, running_service, service_settings

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MAX_BYTES = 4_096
BROKER_MAX_VALUE = 1_000_000  # under kafka-python's and the broker's 1 MiB request limit

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
_value = st.one_of(
    _good, _good, _invalid_utf8, _invalid_json, _not_object, _wrong_type, _missing, _empty, _raw
)
_message = st.one_of(
    st.tuples(st.one_of(st.none(), st.binary(max_size=16)), _value),
    st.tuples(st.binary(min_size=1, max_size=16), _tombstone),  # a tombstone needs a key
)


def generate_inputs(count: int) -> list[tuple[bytes | None, bytes | None]]:
    """About ``count`` (key, value) pairs drawn by hypothesis, plus the oversized values."""
    drawn: list[tuple[bytes | None, bytes | None]] = []

    @settings(
        max_examples=max(1, count // 10),
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(_message, min_size=1, max_size=20))
    def collect(batch: list[tuple[bytes | None, bytes | None]]) -> None:
        drawn.extend(batch)

    while len(drawn) < count:
        collect()
    big = [MAX_BYTES + 1, 64 * 1024, 512 * 1024, BROKER_MAX_VALUE]
    drawn.extend((b"big", b'{"text": "' + b"x" * (size - 12) + b'"}') for size in big)
    return drawn


def with_ordinary_messages(
    drawn: list[tuple[bytes | None, bytes | None]], count: int
) -> list[tuple[bytes | None, bytes | None]]:
    """``drawn`` interleaved one for one with ``count`` ordinary good messages (soak mode)."""
    ordinary = [(None, message(i)) for i in range(count)]
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
    inputs: list[tuple[bytes | None, bytes | None]],
) -> tuple[list[Any], list[Any], Metrics]:
    """Run ``inputs`` through the service: (outputs, dead letters, metrics)."""
    source, out, dlq = topic_factory("in"), topic_factory("out"), topic_factory("dlq")
    producer = KafkaProducer(bootstrap_servers=broker, max_request_size=2 * BROKER_MAX_VALUE)
    for key, value in inputs:
        producer.send(source, key=key, value=value, partition=0)
    producer.flush(timeout=120)
    producer.close()

    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    settings_ = service_settings(kafka, input={"max_bytes": MAX_BYTES})
    outputs_reader, letters_reader = TopicReader(broker, out), TopicReader(broker, dlq)
    try:
        with running_service(settings_, runtime) as service:
            outputs_reader.wait_for(
                lambda _: len(outputs_reader.records) + len(letters_reader.read()) >= len(inputs),
                600,
                "an output or dead letter for every input",
            )
        return outputs_reader.read(1.0), letters_reader.read(1.0), service.metrics
    finally:
        outputs_reader.close()
        letters_reader.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("scale", SCALES)
def test_fuzzed_input_everything_accounted_for(  # noqa: PLR0917 - pytest fixtures
    broker: str, topic_factory, kafka_settings, request: pytest.FixtureRequest, scale: Scale, transport: str
) -> None:
    runtime = ModelRuntime.load(model_for(scale, request), device="cpu", precision="fp32")
    inputs = generate_inputs(scale.bad_inputs if transport == "kafka-python" else scale.bad_inputs // 4)
    if scale.real_model:  # soak: as many ordinary messages as drawn ones, for the throughput ratio
        inputs = with_ordinary_messages(inputs, len(inputs))
    outputs, letters, metrics = classify_all(broker, topic_factory, kafka_settings, runtime, inputs)

    output_offsets = [json.loads(r.value)["source"]["offset"] for r in outputs]
    letter_offsets = [int(dict(r.headers)["source.offset"]) for r in letters]
    assert sorted(output_offsets + letter_offsets) == list(range(len(inputs)))  # each exactly once
    reasons = Counter(dict(r.headers)["error"].decode() for r in letters)
    for reason, count in reasons.items():
        assert metrics.dead_letters.labels(reason=reason)._value.get() == count
    for offset, record in zip(letter_offsets, letters, strict=True):
        key, value = inputs[offset]
        assert record.key == key
        if dict(record.headers).get("truncated") != b"true":
            assert record.value == value
    assert reasons["too_large"] >= 4 and reasons["null_value"] >= 1 and len(outputs) >= 1
    request.node.user_properties.append(("inputs", len(inputs)))
    request.node.user_properties.append(("dead_letter_reasons", dict(reasons)))
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
