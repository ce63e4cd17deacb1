"""Feedback decoding, the bounded de-duplicated set and the held-out split (no broker)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_classifier.config import FeedbackSettings
from stream_classifier.learn.feedback import Rejected, decode_feedback
from stream_classifier.learn.feedback_set import FeedbackBounds, FeedbackItem, FeedbackSet, is_held_out
from stream_classifier.ops.metrics import DEAD_LETTER_REASONS


def _set(per_label: int = 100, labels: int = 10, fraction: float = 0.2) -> FeedbackSet:
    bounds = FeedbackBounds(max_per_label=per_label, max_labels=labels, max_bytes=2**30, min_label_examples=1)
    return FeedbackSet(bounds, holdout_fraction=fraction)


def _limits(max_bytes: int) -> FeedbackSettings:
    return FeedbackSettings(max_bytes=max_bytes)


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
    result = decode_feedback(value, _limits(100))
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert result.reason in DEAD_LETTER_REASONS


def test_valid_feedback_decodes_with_and_without_id() -> None:
    assert decode_feedback(b'{"text": "hi", "label": " pos "}', _limits(100)) == FeedbackItem("hi", "pos")
    assert decode_feedback(b'{"text": "hi", "label": "pos", "id": 7}', _limits(100)) == FeedbackItem(
        "hi", "pos", "7"
    )


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_never_raises(value: bytes) -> None:
    assert isinstance(decode_feedback(value, _limits(150)), FeedbackItem | Rejected)


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


def test_with_the_label_slots_full_a_new_label_waits_and_known_ones_go_on() -> None:
    s = _set(labels=2)
    assert s.add(FeedbackItem("a", "x")) == "added"
    assert s.add(FeedbackItem("b", "y")) == "added"
    assert s.add(FeedbackItem("c", "z")) == "pending"
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
    item = decode_feedback(payload, _limits(1000))
    assert isinstance(item, FeedbackItem)
    assert item.key == FeedbackItem("another text", "other", id="abc").key
    assert item.split_key == "abc"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"text": "hi \ud800 there", "label": "a"}, "invalid_text"),
        ({"text": "hi", "label": "\ud800"}, "invalid_label"),
        ({"text": "hi", "label": "a\udc00b"}, "invalid_label"),
        ({"text": "hi", "label": "bell\u0007"}, "invalid_label"),
        ({"text": "hi", "label": "two\nlines"}, "invalid_label"),
        ({"text": "hi", "label": "a\u202eb"}, "invalid_label"),  # a bidi override
        ({"text": "hi", "label": "zero\u200bwidth"}, "invalid_label"),
        ({"text": "hi", "label": "x" * 101}, "label_too_long"),
        ({"text": "hi", "label": "a", "id": "\ud800"}, "invalid_id"),
    ],
)
def test_hostile_strings_are_rejected_with_a_reason(payload: dict[str, object], reason: str) -> None:
    # ensure_ascii writes lone surrogates as the \u escapes a hostile producer would send.
    result = decode_feedback(json.dumps(payload, ensure_ascii=True).encode(), _limits(1_000))
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert result.reason in DEAD_LETTER_REASONS


@pytest.mark.parametrize(
    "value",
    [
        b"[" * 5_000,  # deeper than the JSON decoder's recursion limit
        b'{"text": "hi", "label": "a", "id": ' + b"9" * 5_000 + b"}",  # over int's digit limit
    ],
)
def test_json_the_decoder_cannot_build_is_invalid_json(value: bytes) -> None:
    result = decode_feedback(value, _limits(65_536))
    assert isinstance(result, Rejected)
    assert result.reason == "invalid_json"


def test_printable_labels_up_to_the_length_cap_are_kept() -> None:
    for label in ("x" * 100, "支払い", "spam 😀", "a b-c_d.e"):
        item = decode_feedback(json.dumps({"text": "hi", "label": label}).encode(), _limits(1_000))
        assert item == FeedbackItem("hi", label)


_ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())


@given(
    st.fixed_dictionaries(
        {"text": st.text(_ANY_CHAR, max_size=20), "label": st.text(_ANY_CHAR, max_size=20)},
        optional={"id": st.one_of(st.text(_ANY_CHAR, max_size=8), st.integers())},
    )
)
@settings(max_examples=300, deadline=None)
def test_every_decoded_item_encodes_and_has_a_printable_label(payload: dict[str, object]) -> None:
    result = decode_feedback(json.dumps(payload, ensure_ascii=True).encode(), _limits(1_000))
    if isinstance(result, FeedbackItem):
        result.text.encode("utf-8")
        (result.id or "").encode("utf-8")
        assert result.label.isprintable()
        assert len(result.label) <= 100
