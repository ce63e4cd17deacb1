"""Decisions, routes and enriched outputs through the serving loop, on the fakes.

Every test drives the real :class:`StreamService` through :class:`ServiceRig`: records are
read back from the fake topics, offsets from the fake group, metrics through the registry.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import pytest

from stream_classifier.stream.codec import OutgoingRecord
from stream_classifier.stream.service import PublishedBatch
from stream_classifier.transport import Record
from tests.fakes.classifier import StubClassifier
from tests.fakes.harness import IN, OUT, ServiceRig, body, header, unit_settings

pytestmark = pytest.mark.timeout(60)

ROUTES = {"spam": "quarantine", "unknown": "review"}
GUARANTEES = ["at_least_once", "exactly_once"]


def by_probability(text: str) -> list[float]:
    """``"p=0.93 ..."``: spam with 0.93 (ham with the rest); anything else ham with 0.8."""
    if text.startswith("p="):
        p = float(text.split(maxsplit=1)[0][2:])
        return [1 - p, p]
    return [0.8, 0.2]


def decision_rig(guarantee: str = "at_least_once", **sections: dict[str, object]) -> ServiceRig:
    settings = unit_settings(
        decision={"thresholds": {"spam": 0.75}, "abstain_label": "unknown"},
        output={"routes": ROUTES},
        processing={"guarantee": guarantee, "commit_interval_ms": 50},
        **sections,
    )
    return ServiceRig(settings, partitions=2, classifier=StubClassifier(probabilities=by_probability))


def routed(rig: ServiceRig) -> dict[str, list[Record]]:
    return {topic: rig.broker.records(topic) for topic in (OUT, "quarantine", "review")}


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_each_message_goes_once_to_the_topic_its_decision_routes_it_to(guarantee: str) -> None:
    spam_p = [
        0.875,
        0.75,
        0.7499,
        0.625,
    ]  # over, at, just under the 0.75 threshold, far under (exact in float32)
    rig = decision_rig(guarantee)
    with rig:
        for i in range(40):
            text = f"p={spam_p[i % 4]} message {i}" if i % 5 else f"hello {i}"
            rig.send(text, partition=i % 2, id=f"m{i}")
        rig.wait(lambda: sum(map(len, routed(rig).values())) == 40 and rig.committed_to_end())

    seen: dict[str, str] = {}
    per_topic_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, records in routed(rig).items():
        for record in records:
            out = body(record)
            assert out["id"] not in seen, "published twice"
            seen[out["id"]] = topic
            p_spam = out["probabilities"]["spam"]
            top = "spam" if p_spam > out["probabilities"]["ham"] else "ham"
            assert out["top_label"] == top
            expected = "unknown" if top == "spam" and p_spam < 0.75 else top
            assert (out["label"], out["abstained"]) == (expected, expected == "unknown")
            assert topic == ROUTES.get(expected, OUT)
            assert header(record, "label") == expected.encode()
            per_topic_partition[(topic, out["source"]["partition"])].append(out["source"]["offset"])
    assert sorted(seen) == sorted(f"m{i}" for i in range(40))
    for offsets in per_topic_partition.values():
        assert offsets == sorted(offsets)  # input order within each output topic
    counts = {topic: len(records) for topic, records in routed(rig).items()}
    assert counts == {OUT: 8, "quarantine": 16, "review": 16}
    for topic, count in counts.items():
        assert rig.metric("outputs_total", topic=topic) == count
    assert rig.metric("abstentions_total", label="spam") == 16
    assert rig.metric("abstentions_total", label="ham") == 0
    assert rig.metric("predictions_total", label="unknown", model_version="stub-1") == 16
    assert rig.metric("predictions_total", label="spam", model_version="stub-1") == 16
    assert rig.metric("prediction_confidence_count", model_version="stub-1") == 40
    assert rig.metric("in_flight_messages") == 0


def test_output_topics_are_counted_from_the_start() -> None:
    rig = decision_rig()
    for topic in (OUT, "quarantine", "review"):
        assert rig.metric("outputs_total", topic=topic) == 0
    for reason in ("too_large", "unencodable"):
        assert rig.metric("outputs_reduced_total", reason=reason) == 0


def test_an_aborted_transaction_spans_every_output_topic() -> None:
    rig = decision_rig("exactly_once")
    rig.transport.fail("commit_transaction", times=1)
    for i in range(20):  # all there before the first transaction opens
        rig.send(f"p={0.95 if i % 2 else 0.6} m{i}" if i % 3 else f"hi {i}", partition=i % 2, id=f"m{i}")
    with rig:
        rig.wait(lambda: rig.committed_to_end() and sum(map(len, routed(rig).values())) == 20)
    ids = [body(r)["id"] for records in routed(rig).values() for r in records]
    assert sorted(ids) == sorted(f"m{i}" for i in range(20))  # read_committed: once each
    uncommitted = {topic: len(rig.broker.records(topic, read_committed=False)) for topic in routed(rig)}
    assert all(uncommitted[t] > len(routed(rig)[t]) for t in routed(rig))  # aborted on every topic
    assert rig.transport.calls["abort_transaction"] == 1 and rig.transport.calls["commit"] == 0


def test_the_fitted_thresholds_of_the_model_apply_unless_settings_override_them() -> None:
    settings = unit_settings(decision={"abstain_label": "unsure", "thresholds": {"ham": 0.7}})
    classifier = StubClassifier(thresholds={"spam": 0.95, "ham": 0.99}, probabilities=by_probability)
    rig = ServiceRig(settings, classifier=classifier)
    with rig:
        rig.send("p=0.9 a", id="a")  # spam 0.9 < fitted 0.95
        rig.send("p=0.97 b", id="b")
        rig.send("plain c", id="c")  # ham 0.8: the setting's 0.7 wins over the fitted 0.99
        rig.wait(lambda: len(rig.outputs()) == 3 and rig.committed_to_end())
    assert [(body(r)["id"], body(r)["label"]) for r in rig.outputs()] == [
        ("a", "unsure"),
        ("b", "spam"),
        ("c", "ham"),
    ]


def test_enriched_outputs_carry_the_input_its_headers_and_its_timestamp() -> None:
    settings = unit_settings(output={"include_input": "original", "headers": "all", "timestamp": "input"})
    rig = ServiceRig(settings)
    value = {"text": "buy spam", "id": "e1", "user": {"name": "Ada"}, "n": [1, 2.5, None]}
    headers = (("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("tenant", b"a"))
    with rig:
        rig.broker.produce(IN, json.dumps(value).encode(), key=b"k", headers=headers, timestamp_ms=1_234)
        rig.wait(lambda: len(rig.outputs()) == 1 and rig.committed_to_end())
    out = rig.outputs()[0]
    assert body(out)["input"] == value and body(out)["label"] == "spam"
    assert "top_label" not in body(out)  # no abstain label: today's decision fields
    assert header(out, "traceparent") == headers[0][1] and header(out, "tenant") == b"a"
    assert header(out, "model.version") == b"stub-1"
    assert out.timestamp_ms == 1_234 and out.key == b"k"


def test_trace_context_is_carried_with_default_settings_and_other_headers_are_not() -> None:
    rig = ServiceRig()
    with rig:
        rig.send("hello", headers=(("traceparent", b"00-ab-cd-01"), ("tenant", b"a")))
        rig.wait(lambda: len(rig.outputs()) == 1 and rig.committed_to_end())
    out = rig.outputs()[0]
    assert [name for name, _ in out.headers] == ["model.version", "label", "traceparent"]
    assert "input" not in body(out) and "text" not in body(out)


def test_an_enriched_output_over_the_limit_goes_out_plain_and_is_counted() -> None:
    settings = unit_settings(
        output={"include_input": "text"}, kafka={"max_request_size": 4_096}, input={"max_bytes": 100_000}
    )
    rig = ServiceRig(settings)
    with rig:
        rig.send("short one", id="s")
        rig.send("long " + "x" * 6_000, id="l")
        rig.wait(lambda: len(rig.outputs()) == 2 and rig.committed_to_end())
    short, long = rig.outputs()
    assert body(short)["text"] == "short one"
    assert "text" not in body(long) and body(long)["id"] == "l"  # plain, never dropped
    assert rig.dead_letters() == []
    assert rig.metric("outputs_reduced_total", reason="too_large") == 1


def test_prediction_series_are_kept_for_the_served_version_and_the_one_before() -> None:
    rig = ServiceRig()
    with rig:
        rig.send("hello")
        rig.wait(lambda: rig.committed(0) == 1)
        for count, version in enumerate(("stub-2", "stub-3"), start=2):
            rig.service.swap_model(StubClassifier(version))  # type: ignore[arg-type]
            rig.send("hello")
            rig.wait(lambda n=count: rig.committed(0) == n)  # type: ignore[misc]
    assert [body(r)["model_version"] for r in rig.outputs()] == ["stub-1", "stub-2", "stub-3"]
    sample = rig.registry.get_sample_value
    assert sample("stream_classifier_predictions_total", {"label": "ham", "model_version": "stub-1"}) is None
    assert sample("stream_classifier_prediction_confidence_count", {"model_version": "stub-1"}) is None
    assert rig.metric("predictions_total", label="ham", model_version="stub-2") == 1
    assert rig.metric("predictions_total", label="ham", model_version="stub-3") == 1
    assert rig.metric("prediction_confidence_count", model_version="stub-3") == 1


def test_the_publish_hook_sees_the_decisions() -> None:
    seen: list[tuple[str, bool]] = []

    def hook(batch: PublishedBatch) -> list[tuple[int, OutgoingRecord]]:
        seen.extend(zip(batch.labels, batch.abstained, strict=True))
        return []

    settings = unit_settings(decision={"thresholds": {"spam": 0.95}, "abstain_label": "unknown"})
    rig = ServiceRig(settings, publish_hook=hook)
    with rig:
        rig.send("spam spam")  # the stub's 0.9 misses 0.95
        rig.send("hello")
        rig.wait(lambda: len(rig.outputs()) == 2 and rig.committed_to_end())
    assert seen == [("unknown", True), ("ham", False)]


def test_thresholds_and_routes_naming_labels_the_model_lacks_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = unit_settings(
        decision={"thresholds": {"spma": 0.9, "spam": 0.9}, "abstain_label": "unknown"},
        output={"routes": {"unknown": "review", "hma": "elsewhere"}},
    )
    with caplog.at_level(logging.WARNING, logger="stream_classifier.stream.output"):
        ServiceRig(settings)
    warned = [r for r in caplog.records if r.getMessage() == "decision_labels_unknown"]
    assert len(warned) == 1
    assert warned[0].sc_fields["labels"] == ["hma", "spma"]  # type: ignore[attr-defined]
