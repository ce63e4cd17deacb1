"""Feedback decoding, the bounded de-duplicated set and the held-out split (no broker)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_classifier.learn.feedback import (
    FeedbackItem,
    FeedbackSet,
    Rejected,
    decode_feedback,
    is_held_out,
)
from stream_classifier.ops.metrics import DEAD_LETTER_REASONS


def _set(per_label: int = 100, labels: int = 10, fraction: float = 0.2) -> FeedbackSet:
    return FeedbackSet(max_per_label=per_label, max_labels=labels, holdout_fraction=fraction)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null_value"),
        (b"x" * 101, "too_large"),
        (b"\xff\xfe", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"label": "a"}', "missing_text"),
        (b'{"text": 3, "label": "a"}', "text_not_string"),
        (b'{"text": "  ", "label": "a"}', "empty_text"),
        (b'{"text": "hi"}', "missing_label"),
        (b'{"text": "hi", "label": " "}', "missing_label"),
        (b'{"text": "hi", "label": 3}', "invalid_label"),
        (b'{"text": "hi", "label": ["a"]}', "invalid_label"),
        (b'{"text": "hi", "label": "a", "id": {"x": 1}}', "invalid_id"),
        (b'{"text": "hi", "label": "a", "id": true}', "invalid_id"),
    ],
)
def test_bad_feedback_is_rejected_with_a_known_reason(value: bytes | None, reason: str) -> None:
    result = decode_feedback(value, max_bytes=100)
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert result.reason in DEAD_LETTER_REASONS


def test_valid_feedback_decodes_with_and_without_id() -> None:
    assert decode_feedback(b'{"text": "hi", "label": " pos "}', 100) == FeedbackItem("hi", "pos")
    assert decode_feedback(b'{"text": "hi", "label": "pos", "id": 7}', 100) == FeedbackItem("hi", "pos", "7")


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_never_raises(value: bytes) -> None:
    assert isinstance(decode_feedback(value, 150), FeedbackItem | Rejected)


def test_repeats_collapse_by_id_and_by_text_label() -> None:
    s = _set()
    assert s.add(FeedbackItem("a text", "x")) == "added"
    assert s.add(FeedbackItem("a text", "x")) == "duplicate"
    assert s.add(FeedbackItem("a text", "y")) == "added"  # same text, other label: another pair
    assert s.add(FeedbackItem("other", "x", id="1")) == "added"
    assert s.add(FeedbackItem("other", "x", id="1")) == "duplicate"
    assert len(s) == 3
    assert s.fresh == 3


def test_relabelled_id_latest_label_wins() -> None:
    s = _set(fraction=0.5)
    s.add(FeedbackItem("the text", "x", id="42"))
    assert s.add(FeedbackItem("the text", "y", id="42")) == "relabelled"
    snap = s.snapshot()
    assert [(e.text, e.label) for e in snap.train + snap.holdout] == [("the text", "y")]
    assert s.counts() == {"y": 1}


def test_per_label_cap_holds_with_reservoir_sampling_and_is_seeded() -> None:
    def fill() -> FeedbackSet:
        s = _set(per_label=10)
        for i in range(500):
            s.add(FeedbackItem(f"text {i}", "x"))
            s.add(FeedbackItem(f"other {i}", "y"))
        return s

    first, second = fill(), fill()
    assert first.counts() == {"x": 10, "y": 10}
    assert len(first) == 20
    assert first.snapshot() == second.snapshot()
    kept = {e.text for e in first.snapshot().train + first.snapshot().holdout if e.label == "x"}
    # A reservoir keeps a sample of the whole stream, not only its first entries.
    assert any(int(t.split()[1]) >= 100 for t in kept)


def test_label_cap_refuses_new_labels_but_keeps_known_ones() -> None:
    s = _set(labels=2)
    assert s.add(FeedbackItem("a", "x")) == "added"
    assert s.add(FeedbackItem("b", "y")) == "added"
    assert s.add(FeedbackItem("c", "z")) == "label_limit"
    assert s.add(FeedbackItem("d", "y")) == "added"
    assert sorted(s.counts()) == ["x", "y"]


def test_relabel_that_empties_a_label_frees_its_slot() -> None:
    s = _set(labels=2)
    s.add(FeedbackItem("a", "x", id="1"))
    s.add(FeedbackItem("b", "y"))
    s.add(FeedbackItem("a", "z", id="1"))
    assert sorted(s.counts()) == ["y", "z"]


def test_fresh_counts_only_fresh_items_until_consumed() -> None:
    s = _set()
    s.add(FeedbackItem("old", "x"), fresh=False)
    s.add(FeedbackItem("new", "x"))
    s.add(FeedbackItem("newer", "x"))
    assert s.fresh == 2
    s.consume_fresh(1)
    assert s.fresh == 1
    s.consume_fresh(5)
    assert s.fresh == 0
    s.add(FeedbackItem("new", "x"))
    assert s.fresh == 0


def test_holdout_split_is_deterministic_and_near_the_fraction() -> None:
    keys = [f"text number {i}" for i in range(4000)]
    held = [k for k in keys if is_held_out(k, 0.2)]
    assert 0.17 < len(held) / len(keys) < 0.23
    assert held == [k for k in keys if is_held_out(k, 0.2)]


def test_snapshot_keeps_one_text_on_one_side() -> None:
    s = _set(fraction=0.5)
    for i in range(50):
        s.add(FeedbackItem(f"t{i}", "x"))
        s.add(FeedbackItem(f"t{i}", "y"))
    snap = s.snapshot()
    assert not {e.text for e in snap.train} & {e.text for e in snap.holdout}
    assert snap.labels == ["x", "y"]


def test_decoded_json_round_trip() -> None:
    payload = json.dumps({"text": "héllo", "label": "greet", "id": "abc"}).encode()
    item = decode_feedback(payload, 1000)
    assert isinstance(item, FeedbackItem)
    assert item.key == "id:abc"
    assert item.split_key == "abc"
