"""The feedback set's bounds under hostile feedback: bytes, label slots, de-duplication keys."""

from __future__ import annotations

import sys
import tracemalloc
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_classifier.learn.feedback_set import FeedbackBounds, FeedbackItem, FeedbackSet

MIB = 1024 * 1024


def _set(
    *,
    per_label: int = 2_000,
    labels: int = 100,
    max_bytes: int = 256 * MIB,
    min_examples: int = 1,
    protected: tuple[str, ...] = (),
    drops: Counter[str] | None = None,
) -> FeedbackSet:
    bounds = FeedbackBounds(
        max_per_label=per_label, max_labels=labels, max_bytes=max_bytes, min_label_examples=min_examples
    )

    def count(reason: str, n: int) -> None:
        if drops is not None:
            drops[reason] += n

    return FeedbackSet(bounds, holdout_fraction=0.2, protected=protected, on_drop=count)


def _held(s: FeedbackSet) -> list[FeedbackItem]:
    snap = s.snapshot()
    return [FeedbackItem(e.text, e.label) for e in snap.train + snap.holdout]


def test_many_large_examples_stay_under_the_byte_bound() -> None:
    bound = 8 * MIB
    body = "x" * 60_000
    tracemalloc.start()
    try:
        s = _set(labels=5, max_bytes=bound)
        before, _ = tracemalloc.get_traced_memory()
        for i in range(1_000):  # 60 MB offered
            # One astral character makes CPython store the whole text at 4 bytes a character.
            text = f"{i} {body}" + ("😀" if i % 10 == 0 else "")
            s.add(FeedbackItem(text, f"label{i % 5}"))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = _held(s)
    assert sum(sys.getsizeof(e.text) for e in held) <= bound
    assert after - before <= bound * 1.1  # what the set really holds, container overhead included
    per_label = Counter[str]()
    for e in held:
        per_label[e.label] += sys.getsizeof(e.text)
    assert len(per_label) == 5
    assert min(per_label.values()) >= max(per_label.values()) // 2  # the labels share the budget


def test_junk_labels_cannot_block_a_real_label() -> None:
    s = _set(labels=100, min_examples=3)
    for junk in range(100):  # every label slot taken by junk with enough examples to qualify
        for i in range(3):
            s.add(FeedbackItem(f"junk {junk} {i}", f"junk-{junk}"))
    for i in range(10_000):  # then a flood of one-off labels, a real label 2 % of it
        s.add(FeedbackItem(f"noise {i}", f"noise-{i}"))
        if i % 50 == 0:
            s.add(FeedbackItem(f"please refund order {i}", "refund"))
    counts = s.counts()
    assert counts["refund"] > 3  # it got a slot, and kept its examples since
    assert len(counts) == 100
    assert not any(label.startswith("noise-") for label in counts)
    assert s.pending_labels <= 1_000  # ten per label slot


def test_model_labels_always_get_a_slot() -> None:
    s = _set(labels=4, min_examples=3, protected=("billing", "tech"))
    for junk in range(10):
        for i in range(5):
            s.add(FeedbackItem(f"junk {junk} {i}", f"junk-{junk}"))
    assert s.add(FeedbackItem("my bill is wrong", "billing")) == "added"
    assert s.add(FeedbackItem("the app crashes", "tech")) == "added"
    counts = s.counts()
    assert counts["billing"] == counts["tech"] == 1
    assert len(counts) == 4  # two open slots for the rest


def test_a_new_label_needs_distinct_examples_before_it_gets_a_slot() -> None:
    s = _set(min_examples=3)
    assert s.add(FeedbackItem("first", "new")) == "pending"
    for _ in range(5):  # repeats are not more evidence
        assert s.add(FeedbackItem("first", "new")) == "duplicate"
    assert s.add(FeedbackItem("second", "new")) == "pending"
    assert "new" not in s.counts()
    assert s.snapshot().labels == []
    assert s.add(FeedbackItem("third", "new")) == "added"
    assert s.counts() == {"new": 3}  # the pending examples come along
    assert s.fresh == 3


def test_with_slots_full_only_a_stronger_label_evicts_the_weakest() -> None:
    drops: Counter[str] = Counter()
    s = _set(labels=2, min_examples=2, drops=drops)
    for i in range(5):
        s.add(FeedbackItem(f"a {i}", "a"))
    s.add(FeedbackItem("b 0", "b"))
    s.add(FeedbackItem("b 1", "b"))
    assert sorted(s.counts()) == ["a", "b"]
    s.add(FeedbackItem("c 0", "c"))
    assert s.add(FeedbackItem("c 1", "c")) == "pending"  # as strong as "b" only: it waits
    assert s.add(FeedbackItem("c 2", "c")) == "added"  # stronger than "b": "b" gives up its slot
    assert s.counts() == {"a": 5, "c": 2}  # a pending label holds min_label_examples examples
    assert drops == {"label_evicted": 2, "label_cap": 1}


def test_deduplication_keys_are_fixed_size_hashes() -> None:
    long_text = "y" * 60_000
    item = FeedbackItem(long_text, "a")
    assert isinstance(item.key, bytes)
    assert len(item.key) == 16
    assert FeedbackItem(long_text, "a").key == item.key
    assert FeedbackItem(long_text, "b").key != item.key
    assert FeedbackItem("other", "a", id="7").key == FeedbackItem("changed", "b", id="7").key
    s = _set()
    assert s.add(item) == "added"
    assert s.add(FeedbackItem(long_text, "a")) == "duplicate"
    assert s.add(FeedbackItem(long_text, "b")) == "added"
    assert len(s) == 2


def test_the_same_topic_content_rebuilds_the_same_set() -> None:
    def fill() -> FeedbackSet:
        s = _set(per_label=20, labels=3, max_bytes=MIB, min_examples=2)
        for i in range(2_000):
            s.add(FeedbackItem(f"{i} " + "z" * (i % 7_000), f"label{i % 7}"))
        return s

    first, second = fill(), fill()
    assert first.snapshot() == second.snapshot()
    assert first.counts() == second.counts()


def test_a_promoted_models_labels_become_protected() -> None:
    s = _set(labels=3, min_examples=1, protected=("billing",))
    s.add(FeedbackItem("bill", "billing"))
    for i in range(3):
        s.add(FeedbackItem(f"refund {i}", "refund"))
    s.add(FeedbackItem("crash", "tech"))
    assert sorted(s.counts()) == ["billing", "refund", "tech"]
    s.protect(["billing", "refund"])  # the new champion knows refund, not tech
    for i in range(5):  # a stronger open label takes the one open slot left...
        s.add(FeedbackItem(f"late {i}", "late"))
    assert sorted(s.counts()) == ["billing", "late", "refund"]
    for i in range(50):  # ...but never a protected one's
        s.add(FeedbackItem(f"junk {i}", "junk"))
    assert {"billing", "refund"} <= s.counts().keys()


def test_more_real_labels_than_slots_fill_every_slot() -> None:
    s = _set(labels=5, min_examples=3)
    for i in range(600):  # six labels, interleaved: the pending labels must not churn
        s.add(FeedbackItem(f"text {i}", f"label{i % 6}"))
    assert len(s.counts()) == 5
    assert s.pending_labels == 1


def test_a_flood_of_large_one_off_labels_keeps_to_the_pending_share() -> None:
    bound = 8 * MIB
    s = _set(labels=10, max_bytes=bound, min_examples=3, protected=("billing",))
    body = "x" * 60_000
    for i in range(50):
        s.add(FeedbackItem(f"bill {i} {body}", "billing"))
    for i in range(2_000):  # 120 MB of junk, each label seen once
        s.add(FeedbackItem(f"junk {i} {body}", f"junk-{i}"))
    assert s.held_bytes <= bound
    assert s.counts() == {"billing": 50}  # the admitted examples were not squeezed out
    assert s.held_bytes - sum(sys.getsizeof(e.text) for e in _held(s)) <= bound // 8 + 50 * 1_000


def test_junk_filling_the_pending_share_cannot_block_a_real_label() -> None:
    s = _set(labels=10, max_bytes=8 * MIB, min_examples=3)
    body = "x" * 62_000
    for junk in range(8):  # two examples each: the pending eighth of the budget full, none admitted
        for i in range(2):
            s.add(FeedbackItem(f"junk {junk} {i} {body}", f"junk-{junk}"))
    for i in range(3):
        s.add(FeedbackItem(f"refund {i} {body}", "refund"))
    assert s.counts() == {"refund": 3}


_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(0, 40),  # text
            st.integers(0, 12),  # label
            st.one_of(st.none(), st.integers(0, 20)),  # id
            st.sampled_from([10, 5_000, 30_000]),  # text size
        ),
        st.tuples(st.just("protect"), st.integers(0, 12)),
    ),
    max_size=150,
)


@given(_OPS)
@settings(max_examples=150, deadline=None)
def test_every_bound_holds_after_any_sequence(ops: list[tuple[object, ...]]) -> None:
    bound = MIB
    s = _set(per_label=4, labels=3, max_bytes=bound, min_examples=2, protected=("label0",))
    protected = {"label0"}
    for op in ops:
        if op[0] == "protect":
            protected.add(f"label{op[1]}")
            s.protect([f"label{op[1]}"])
            continue
        _, text, label, id_, size = op
        s.add(FeedbackItem(f"{text} " + "t" * int(size), f"label{label}", None if id_ is None else str(id_)))
        counts = s.counts()
        assert s.held_bytes <= bound
        assert len(counts) <= max(3, len(protected))
        assert len([c for c in counts if c not in protected]) <= max(3 - len(protected), 0)
        assert all(0 < n <= 4 for n in counts.values())
        assert s.pending_labels <= 30
        assert len(s) == sum(counts.values())
        held = _held(s)
        assert {e.label for e in held} == set(counts)
        assert sum(sys.getsizeof(e.text) for e in held) <= s.held_bytes
