"""End to end through the real broker and real models: predictions, keys, order, dead letters, swap."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import DEAD_LETTER_REASONS, PREFIX
from stream_classifier.stream import codec
from tests.fixtures.broker import TRANSPORTS, committed_offsets, produce, read_all
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.service_support import output_body, running_service, service_settings, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("transport", TRANSPORTS)]

TEXTS = [
    "the service was quick and friendly",
    "terrible, it broke after a day",
    "I love this product",
    "worst purchase I have ever made",
    "pretty good value for the money",
    "it never arrived and nobody answered",
]


@pytest.fixture(scope="module")
def tiny_runtime(tiny_model_dir: Path) -> ModelRuntime:
    return ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")


def test_n_in_n_out_equal_to_predict_proba_with_keys_and_order(
    any_broker: BrokerTarget, tiny_runtime: ModelRuntime, transport: str
) -> None:
    """On both brokers (the conformance subset's end to end)."""
    broker, topic_factory, kafka_settings = any_broker.bootstrap, any_broker.topic, any_broker.settings
    source, out, dlq = topic_factory("in", partitions=3), topic_factory("out"), topic_factory("dlq")
    n = 60
    texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(n)]
    inputs = [
        (f"key-{i % 7}".encode(), json.dumps({"text": t, "id": f"m{i}"}).encode())
        for i, t in enumerate(texts)
    ]
    produce(broker, source, inputs)
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    settings = service_settings(kafka)

    with running_service(settings, tiny_runtime) as service:
        outputs = read_all(broker, out, n)
        assert len(outputs) == n
        wait_until(lambda: service.in_flight == 0, 30, "every offset committed")

    expected = tiny_runtime.predict_proba(texts)
    by_id = {f"m{i}": i for i in range(n)}
    seen: dict[int, list[int]] = defaultdict(list)
    for record in outputs:
        body = output_body(record)
        i = by_id[body["id"]]
        assert record.key == inputs[i][0]
        probabilities = body["probabilities"]
        assert list(probabilities) == tiny_runtime.labels
        np.testing.assert_allclose(list(probabilities.values()), expected[i], atol=1e-5)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert body["label"] == tiny_runtime.labels[int(np.argmax(expected[i]))]
        assert body["model_version"] == tiny_runtime.version
        assert dict(record.headers)[codec.MODEL_VERSION_HEADER] == tiny_runtime.version.encode()
        assert body["source"]["topic"] == source
        seen[body["source"]["partition"]].append(body["source"]["offset"])
    assert sum(len(v) for v in seen.values()) == n and len(seen) > 1
    for offsets in seen.values():  # the output topic has one partition: its order is global
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    commits = committed_offsets(broker, kafka.group_id, source)
    assert {p: commits[p] for p in seen} == {p: max(offsets) + 1 for p, offsets in seen.items()}
    assert read_all(broker, dlq, 1, timeout_s=1) == []


class PoisonedRuntime(ModelRuntime):
    """The real runtime with one injected fault: tokenising a text containing POISON fails."""

    def prepare(self, texts):  # type: ignore[no-untyped-def]
        if any("POISON" in text for text in texts):
            raise ValueError("injected fault")
        return super().prepare(texts)


def test_every_dead_letter_reason(broker: str, topic_factory, kafka_settings, tiny_model_dir: Path) -> None:
    runtime = PoisonedRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    source, out, dlq = topic_factory("in"), topic_factory("out"), topic_factory("dlq")
    big = b'{"text": "' + b"x" * 3_000 + b'"}'
    cases: list[tuple[str | None, bytes | None]] = [
        ("null_value", None),
        ("too_large", big),
        ("invalid_utf8", b'{"text": "\xff"}'),
        ("invalid_json", b'{"text": '),
        ("not_an_object", b"[1, 2]"),
        ("missing_text", b'{"body": "x"}'),
        ("text_not_string", b'{"text": 5}'),
        ("empty_text", b'{"text": "   "}'),
        ("invalid_text", b'{"text": "lone \\ud800 surrogate"}'),
        ("invalid_id", b'{"text": "fine", "id": "\\udfff"}'),
        (None, b'{"text": "a fine message", "id": "ok-1"}'),
        ("inference_failed", b'{"text": "POISON pill"}'),
        (None, b'{"text": "another fine message", "id": "ok-2"}'),
    ]
    assert {reason for reason, _ in cases if reason} == set(codec.CODEC_REASONS) | {codec.INFERENCE_FAILED}
    produce(broker, source, [(f"k{i}".encode(), value) for i, (_, value) in enumerate(cases)])
    kafka = kafka_settings(
        input_topics=[source], output_topic=out, dead_letter_topic=dlq, max_request_size=2_048
    )
    settings = service_settings(
        kafka, input={"max_bytes": 1_000}, batching={"max_batch_size": 64, "max_wait_ms": 200}
    )

    with running_service(settings, runtime) as service:
        letters = read_all(broker, dlq, 11)
        outputs = read_all(broker, out, 2)
        metrics = service.metrics

    assert sorted(output_body(r)["id"] for r in outputs) == ["ok-1", "ok-2"]
    assert len(letters) == 11
    for record in letters:
        headers = dict(record.headers)
        reason = headers["error"].decode()
        index = [r for r, _ in cases].index(reason)
        assert record.key == f"k{index}".encode()
        assert headers["error.message"]
        assert (headers["source.topic"], headers["source.partition"]) == (source.encode(), b"0")
        assert headers["source.offset"] == str(index).encode()
        if reason == "too_large":  # 3 KB does not fit 2 KB requests: cut, and marked so
            assert headers["truncated"] == b"true" and headers["original.size"] == str(len(big)).encode()
            assert big.startswith(record.value) and len(record.value) < len(big)
        else:
            assert record.value == cases[index][1]
        assert metrics.registry.get_sample_value(f"{PREFIX}_dead_letters_total", {"reason": reason}) == 1
    assert set(DEAD_LETTER_REASONS) >= {dict(r.headers)["error"].decode() for r in letters}


def test_minilm_end_to_end_and_hot_swap(
    broker: str, topic_factory, kafka_settings, tiny_runtime: ModelRuntime, minilm_model_dir: Path
) -> None:
    minilm = ModelRuntime.load(minilm_model_dir, device="cpu", precision="fp32")
    assert minilm.version != tiny_runtime.version
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    first = [f"{t} (first)" for t in TEXTS]
    second = [f"{t} (second)" for t in TEXTS * 2]
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)

    with running_service(service_settings(kafka), tiny_runtime) as service:
        produce(broker, source, [(None, json.dumps({"text": t, "id": t}).encode()) for t in first])
        assert len(read_all(broker, out, len(first))) == len(first)
        service.swap_model(minilm)
        produce(broker, source, [(None, json.dumps({"text": t, "id": t}).encode()) for t in second])
        outputs = read_all(broker, out, len(first) + len(second))
        assert service.model_version == minilm.version

    bodies = {output_body(r)["id"]: output_body(r) for r in outputs}
    assert len(bodies) == len(set(first + second))
    for texts, runtime in ((first, tiny_runtime), (sorted(set(second)), minilm)):
        expected = runtime.predict_proba(texts)
        for text, row in zip(texts, expected, strict=True):
            assert bodies[text]["model_version"] == runtime.version
            np.testing.assert_allclose(list(bodies[text]["probabilities"].values()), row, atol=1e-5)


def test_backpressure_bounds_in_flight_and_drops_nothing(
    broker: str, topic_factory, kafka_settings, tiny_runtime: ModelRuntime
) -> None:
    source, out, dlq = topic_factory("in", partitions=2), topic_factory("out"), topic_factory("dlq")
    n, limit = 150, 8
    produce(broker, source, [(None, json.dumps({"text": f"text {i}", "id": i}).encode()) for i in range(n)])
    kafka = kafka_settings(input_topics=[source], output_topic=out, dead_letter_topic=dlq)
    settings = service_settings(
        kafka, batching={"max_batch_size": 4, "max_wait_ms": 5, "max_in_flight": limit}
    )
    observed: list[float] = []
    with running_service(settings, tiny_runtime) as service:
        registry = service.metrics.registry
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                observed.append(registry.get_sample_value(f"{PREFIX}_in_flight_messages") or 0.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        outputs = read_all(broker, out, n)
        done.set()
        sampler.join()
    assert sorted(output_body(r)["id"] for r in outputs) == list(range(n))
    assert max(observed) <= limit
    assert max(observed) > 0
