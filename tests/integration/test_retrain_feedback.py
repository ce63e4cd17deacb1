"""Feedback topics through the real broker: bad feedback dead-lettered, restart rebuilds the set."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.config import Settings
from stream_classifier.learn.feedback import FeedbackReader
from stream_classifier.learn.learning import retrain_once
from stream_classifier.ops.metrics import Metrics
from stream_classifier.transport import make_transport
from tests.fixtures.broker import produce, read_all
from tests.integration.retrain_support import feedback_messages, good_feedback, learn_settings, seeded_store
from tests.integration.service_support import wait_until

pytestmark = pytest.mark.integration

BAD = [
    (b"not json at all", "invalid_json"),
    (b'{"label": "billing"}', "missing_text"),
    (b'{"text": "", "label": "billing"}', "empty_text"),
    (b'{"text": "no label here"}', "missing_label"),
    (b'{"text": "numeric label", "label": 7}', "invalid_label"),
    (b'{"text": "' + b"x" * 600 + b'", "label": "billing"}', "too_large"),
]

HELD = "stream_classifier_feedback_examples"


def _dead_letters(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("stream_classifier_dead_letters_total", {"reason": reason})


@contextmanager
def reading(settings: Settings, metrics: Metrics, baseline: dict[str, int]) -> Iterator[FeedbackReader]:
    producer = make_transport(settings.kafka).producer()
    reader = FeedbackReader(settings, producer, metrics, baseline=baseline)
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    try:
        wait_until(reader.caught_up.is_set, 60, "the feedback rebuild")
        yield reader
    finally:
        reader.stop()
        thread.join(10)
        producer.close(10)


def test_bad_feedback_is_dead_lettered_and_a_restart_rebuilds_the_set(
    broker: str, topic_factory, kafka_settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    feedback, updates, dlq = topic_factory("fb"), topic_factory("upd"), topic_factory("dlq")
    store = seeded_store(tiny_model_dir, tmp_path / "store")
    good = good_feedback(with_returns=True)
    messages = feedback_messages(good, id_prefix="g")
    # Repeats collapse (same id), and a relabel of an id wins over the earlier label.
    messages += feedback_messages(good[:3], id_prefix="g")
    messages.append((None, json.dumps({"text": good[0][0], "label": "tech", "id": "g0"}).encode()))
    messages += [(b"bad-%d" % i, value) for i, (value, _) in enumerate(BAD)]
    produce(broker, feedback, messages)
    settings = learn_settings(kafka_settings(dead_letter_topic=dlq), store.root, feedback, updates)
    settings.feedback.max_bytes = 512

    # The trainer's first life: rebuild (dead-lettering bad feedback), one run, which records
    # how far it read.
    metrics = Metrics(CollectorRegistry())
    record = retrain_once(settings, metrics, make_transport(settings.kafka), force=True)
    assert record.outcome in {"promoted", "rejected"}, record
    assert record.examples["fresh"] == len(good) + 1  # every example, plus the relabel
    assert record.examples["train"] >= record.examples["holdout"] > 0
    letters = read_all(broker, dlq, len(BAD))
    reasons = sorted(dict(r.headers)["error"].decode() for r in letters)
    assert reasons == sorted(reason for _, reason in BAD)
    assert {r.key for r in letters} == {b"bad-%d" % i for i in range(len(BAD))}
    for _, reason in BAD:
        assert _dead_letters(metrics, reason) == 1
    progress = store.read().feedback_offsets
    assert progress == {f"{feedback}:0": len(messages)}

    # Its second life: the set is rebuilt from the beginning of the topic.
    restarted = Metrics(CollectorRegistry())
    with reading(settings, restarted, baseline=progress) as second:
        snapshot = second.snapshot()[0]
        assert len(snapshot.train) + len(snapshot.holdout) == len(good)  # repeats collapsed
        relabelled = [e for e in snapshot.train + snapshot.holdout if e.text == good[0][0]]
        assert [e.label for e in relabelled] == ["tech"]  # the latest label won
        assert second.fresh == 0  # nothing new since the last run
        held = {
            label: restarted.registry.get_sample_value(HELD, {"label": label}) for label in snapshot.labels
        }
        assert held == {"billing": 7, "shipping": 8, "tech": 9, "returns": 16}
        produce(broker, feedback, feedback_messages([("a brand new complaint about my bill", "billing")]))
        wait_until(lambda: second.fresh == 1, 30, "the new example")
    for _, reason in BAD:  # not dead-lettered a second time
        assert _dead_letters(restarted, reason) == 0
    assert len(read_all(broker, dlq, len(BAD) + 1, timeout_s=3)) == len(BAD)
