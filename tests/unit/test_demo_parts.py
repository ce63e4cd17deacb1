"""The demo's own parts without a broker: its messages, its malformed inputs, its live view."""

from __future__ import annotations

import io
import json

from stream_classifier.config import InputSettings
from stream_classifier.demo import BAD_MESSAGES
from stream_classifier.demo.clients import demo_messages
from stream_classifier.demo.view import Console, LiveView, Seen
from stream_classifier.model.examples import Example
from stream_classifier.stream.codec import InputDecoder, Rejected
from stream_classifier.transport import Record

EXAMPLES = [Example("cheap loans now", "spam"), Example("meeting moved to 3pm", "ham")]


def test_json_messages_carry_the_run_id_as_key_and_id_and_cycle_the_examples() -> None:
    messages, expected = demo_messages(
        EXAMPLES, 5, "demo-x", input_format="json", text_field="body", id_field="msg_id"
    )
    assert [key for key, _ in messages] == [f"demo-x-{i:05d}".encode() for i in range(5)]
    values = [json.loads(value) for _, value in messages]
    assert [v["body"] for v in values] == [e.text for e in (EXAMPLES * 3)[:5]]
    assert [v["msg_id"] for v in values] == [key.decode() for key, _ in messages]
    assert expected == {
        key.decode(): e.label for (key, _), e in zip(messages, (EXAMPLES * 3)[:5], strict=True)
    }


def test_text_messages_are_the_bare_utf8_text() -> None:
    messages, _ = demo_messages(EXAMPLES, 2, "r", input_format="text", text_field="text", id_field="id")
    assert [value for _, value in messages] == [e.text.encode() for e in EXAMPLES]


def test_the_malformed_messages_hit_five_different_dead_letter_reasons_in_the_real_codec() -> None:
    decoder = InputDecoder(InputSettings())
    reasons = []
    for offset, (key, value) in enumerate(BAD_MESSAGES):
        outcome = decoder.decode(Record("texts", 0, offset, key, value, (), None))
        assert isinstance(outcome, Rejected)
        reasons.append(outcome.reason)
    assert sorted(reasons) == ["empty_text", "invalid_json", "invalid_utf8", "missing_text", "null_value"]


def test_live_view_counts_accuracy_and_dead_letters() -> None:
    out = io.StringIO()
    view = LiveView(Console(out), {"r-1": "cheap loans now"}, {"r-1": "spam", "r-2": "ham"}, show=1)
    view.start_clock()
    view.record(Seen(key="r-1", label="spam", confidence=0.9))
    view.record(Seen(key="r-2", label="spam", confidence=0.6))
    view.record(Seen(key="r-bad", reason="invalid_json"))
    view.progress(force=True)
    view.progress()  # nothing new since: no second line
    view.summary()
    text = out.getvalue()
    assert view.tally.predicted == 2 and view.tally.correct == 1 and view.tally.done == 3
    assert "[ok  ] spam   p=0.90  cheap loans now" in text
    assert text.count("progress  2/2 classified") == 1
    assert "accuracy 50.0% against the sample's labels (1/2)" in text
    assert "dead letters 1: invalid_json 1" in text
