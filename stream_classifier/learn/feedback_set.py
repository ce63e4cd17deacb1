"""The bounded, de-duplicated set of feedback examples, and the held-out split.

:class:`FeedbackSet` invariants, for the bounds of :class:`FeedbackBounds`:

- one entry per key: a 16-byte BLAKE2b hash of the id when given, else of the pair
  (text, label). A repeat of a key with the same content is a no-op; a relabelled id moves
  to its new label (latest wins), leaving its old label even while the new one is pending;
- a label is *admitted* (in :meth:`~FeedbackSet.snapshot` and
  :meth:`~FeedbackSet.counts`: trained on) or *pending*. The protected labels (the served
  model's and ``feedback.allowed_labels``) are admitted at their first example and each
  reserves one of the ``max_labels`` slots; a model label is never evicted. Any other
  label is pending until it holds ``min_label_examples`` distinct examples, then takes a
  free slot; with none free, it takes the slot of the open label seen the fewest times
  (the least recently seen among equals) only if it has been seen strictly more often, and
  that label's examples are dropped (``label_evicted``). Junk labels therefore never keep
  a label that is seen more often than they are out of a slot;
- at most ``10 * max_labels`` labels are pending, kept by the Space-Saving rule: a
  newcomer to a full table replaces the pending label with the lowest count (the least
  recently seen among equals) and takes over that count plus one, its examples dropped
  (``candidate_evicted``). One-off junk labels replace one another, and a label with more
  than 1/(``10 * max_labels``) of the pending labels' sightings is never replaced;
- at most ``max_per_label`` entries per admitted label and ``min_label_examples`` (or
  ``max_per_label`` if less) per pending one, kept by reservoir sampling (``label_cap``).
  Only held entries are remembered, so a repeat of an entry the set let go counts as a new
  sighting;
- at most ``max_bytes`` of entries, counted as CPython holds them (text, label and id
  objects plus a fixed overhead per entry; a text with one astral character costs four
  bytes a character). Pending labels hold at most an eighth of it: over that, the label
  just seen replaces the lowest pending ones as above. Over the whole, the admitted label holding
  the most bytes gives up a random entry (``byte_budget``), so the labels share the budget;
- so, at most ``max(max_labels, protected)`` admitted labels of ``max_per_label`` entries
  and ``10 * max_labels`` pending labels of ``min_label_examples`` entries, all in at most
  ``max_bytes``. Every choice is seeded, so a rebuild from the same topic content and the
  same protected labels holds the same entries;
- an entry's side of the train/held-out split is a pure function of its id (or, without
  one, its text), so it never changes across restarts and the same text never sits on
  both sides.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

from stream_classifier.config import FeedbackSettings
from stream_classifier.model.examples import Example
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import FeedbackDropReason

logger = logging.getLogger(__name__)

_KEY_BYTES = 16
# An entry's own objects besides its strings: the entry, its item, its key, a dict slot, a list slot.
_ENTRY_OVERHEAD = 320
# Pending labels: up to this many per label slot, in up to this share of the byte budget.
_PENDING_PER_SLOT = 10
_PENDING_SHARE = 8  # 1/8


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """One valid feedback message."""

    text: str
    label: str
    id: str | None = None

    @property
    def key(self) -> bytes:
        """The de-duplication key: a 16-byte hash of the id when given, else of text and label."""
        digest = hashlib.blake2b(digest_size=_KEY_BYTES)
        if self.id is not None:
            digest.update(b"id\0" + self.id.encode("utf-8", "surrogatepass"))
        else:
            label = self.label.encode("utf-8", "surrogatepass")
            digest.update(b"tl%d\0" % len(label) + label)
            digest.update(self.text.encode("utf-8", "surrogatepass"))
        return digest.digest()

    @property
    def split_key(self) -> str:
        """What decides the held-out side: the id when given, else the text alone."""
        return self.id if self.id is not None else self.text


def is_held_out(split_key: str, fraction: float) -> bool:
    """Whether ``split_key`` belongs to the held-out side (stable across processes)."""
    digest = hashlib.sha256(split_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


AddOutcome = Literal["added", "pending", "relabelled", "duplicate", "dropped"]
DropCallback = Callable[[FeedbackDropReason, int], None]


@dataclass(frozen=True)
class FeedbackSnapshot:
    """The held feedback split for one retraining run."""

    train: list[Example]
    holdout: list[Example]

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.train} | {e.label for e in self.holdout})


@dataclass(frozen=True)
class FeedbackBounds:
    """The limits of a :class:`FeedbackSet` (see the module docstring)."""

    max_per_label: int
    max_labels: int
    max_bytes: int
    min_label_examples: int

    @staticmethod
    def of(settings: FeedbackSettings) -> FeedbackBounds:
        return FeedbackBounds(
            max_per_label=settings.max_examples_per_label,
            max_labels=settings.max_labels,
            max_bytes=settings.max_held_bytes,
            min_label_examples=settings.min_label_examples,
        )


@dataclass(slots=True)
class _Entry:
    item: FeedbackItem
    size: int
    fresh: bool


@dataclass(slots=True)
class _Label:
    """One label's held keys (its reservoir) and what its slot policy weighs."""

    keys: list[bytes] = field(default_factory=list)
    seen: int = 0  # distinct sightings since the label was taken up
    size: int = 0  # bytes of its entries
    touched: int = 0  # the set's sighting clock at its latest sighting
    count: int = 0  # its Space-Saving count while pending
    pending: bool = False


def _entry_size(item: FeedbackItem) -> int:
    id_size = sys.getsizeof(item.id) if item.id is not None else 0
    return sys.getsizeof(item.text) + sys.getsizeof(item.label) + id_size + _ENTRY_OVERHEAD


class FeedbackSet:
    """The bounded, de-duplicated set of feedback examples (not thread-safe; see the reader)."""

    def __init__(
        self,
        bounds: FeedbackBounds,
        *,
        holdout_fraction: float,
        protected: Iterable[str] = (),
        on_drop: DropCallback | None = None,
        seed: int = 0,
    ) -> None:
        self._bounds = bounds
        self._holdout_fraction = holdout_fraction
        self._protected = set(protected)
        self._on_drop = on_drop
        self._pending_cap = min(bounds.min_label_examples, bounds.max_per_label)
        self._pending_limit = _PENDING_PER_SLOT * bounds.max_labels
        self._pending_budget = bounds.max_bytes // _PENDING_SHARE
        self._rng = random.Random(seed)
        self._entries: dict[bytes, _Entry] = {}
        self._admitted: dict[str, _Label] = {}
        self._pending: dict[str, _Label] = {}
        self._bytes = 0
        self._pending_bytes = 0
        self._clock = 0
        self._fresh = 0

    def __len__(self) -> int:
        """Entries of admitted labels (what a run would train and evaluate on)."""
        return sum(len(state.keys) for state in self._admitted.values())

    @property
    def fresh(self) -> int:
        """Fresh examples admitted or relabelled and not yet used by a run (:meth:`consume_fresh`)."""
        return self._fresh

    @property
    def held_bytes(self) -> int:
        """Bytes of every held entry, pending labels included (at most ``max_bytes``)."""
        return self._bytes

    @property
    def pending_labels(self) -> int:
        return len(self._pending)

    def protects(self, label: str) -> bool:
        return label in self._protected

    def consume_fresh(self, count: int) -> None:
        """Forget ``count`` fresh examples (a retraining run has used them)."""
        self._fresh = max(self._fresh - count, 0)

    def counts(self) -> dict[str, int]:
        """Held examples per admitted label."""
        return {label: len(state.keys) for label, state in self._admitted.items()}

    def add(self, item: FeedbackItem, *, fresh: bool = True) -> AddOutcome:
        """Add ``item``; ``fresh=False`` for items an earlier run already had (restart rebuild)."""
        key = item.key
        previous = self._entries.get(key)
        if previous is not None:
            if previous.item == item:
                return "duplicate"
            self._discard(key, previous.item.label)
        label = item.label
        state = self._take_up(label)
        self._clock += 1
        state.touched = self._clock
        state.seen += 1
        was_admitted = label in self._admitted
        if not was_admitted:
            state.count += 1
        cap = self._bounds.max_per_label if was_admitted else self._pending_cap
        self._place(state, key, _Entry(item, _entry_size(item), fresh), cap)
        if state.pending:
            self._fit_pending(label)
            if label in self._pending:
                self._consider(label)
        self._fit_budget()
        if key not in self._entries:
            return "dropped"
        if label not in self._admitted:
            return "pending"
        if was_admitted and fresh:
            self._fresh += 1
        return "relabelled" if previous is not None else "added"

    def protect(self, labels: Iterable[str]) -> None:
        """Protect ``labels`` too (a newly promoted model's); open labels over the slots left go."""
        self._protected.update(labels)
        for label in [label for label in self._pending if label in self._protected]:
            self._admit(label)
        open_labels = sorted(self._open_labels(), key=self._weight)
        for label in open_labels[: max(len(open_labels) - self._open_slots(), 0)]:
            self._drop_label(label, "label_evicted")
        self._fit_budget()

    def snapshot(self) -> FeedbackSnapshot:
        """The admitted examples, split into train and held-out, in a stable (key) order."""
        train: list[Example] = []
        holdout: list[Example] = []
        for key in sorted(chain.from_iterable(state.keys for state in self._admitted.values())):
            item = self._entries[key].item
            side = holdout if is_held_out(item.split_key, self._holdout_fraction) else train
            side.append(Example(text=item.text, label=item.label))
        return FeedbackSnapshot(train=train, holdout=holdout)

    # ------------------------------------------------------------------ label slots

    def _take_up(self, label: str) -> _Label:
        """``label``'s state, made admitted (protected) or pending (any other) if new."""
        state = self._admitted.get(label) or self._pending.get(label)
        if state is not None:
            return state
        if label in self._protected:
            state = self._admitted[label] = _Label()
            return state
        state = _Label(pending=True)
        if len(self._pending) >= self._pending_limit:
            victim = self._lowest_pending()
            state.count = self._pending[victim].count
            self._drop_label(victim, "candidate_evicted")
        self._pending[label] = state
        return state

    def _lowest_pending(self, besides: str | None = None) -> str:
        """The pending label with the lowest count (the least recently seen among equals)."""
        return min(
            (name for name in self._pending if name != besides),
            key=lambda name: (self._pending[name].count, self._pending[name].touched),
        )

    def _fit_pending(self, label: str) -> None:
        """Make the pending labels fit their share of the bytes for ``label``, just seen.

        As in Space-Saving, ``label`` replaces the lowest others and takes over their count;
        it goes itself only when it alone is over the share.
        """
        state = self._pending[label]
        while self._pending_bytes > self._pending_budget and len(self._pending) > 1:
            victim = self._lowest_pending(besides=label)
            state.count = max(state.count, self._pending[victim].count + 1)
            self._drop_label(victim, "candidate_evicted")
        if self._pending_bytes > self._pending_budget:
            self._drop_label(label, "candidate_evicted")

    def _consider(self, label: str) -> None:
        """Admit pending ``label`` if it holds enough examples and a slot is free or weaker."""
        state = self._pending[label]
        if len(state.keys) < self._pending_cap:
            return
        open_labels = self._open_labels()
        if len(open_labels) >= self._open_slots():
            if not open_labels:
                return
            weakest = min(open_labels, key=self._weight)
            if self._admitted[weakest].seen >= state.seen:
                return
            log_event(
                logger,
                "feedback_label_evicted",
                logging.WARNING,
                label=weakest,
                seen=self._admitted[weakest].seen,
                by=label,
                by_seen=state.seen,
            )
            self._drop_label(weakest, "label_evicted")
        self._admit(label)

    def _admit(self, label: str) -> None:
        state = self._pending.pop(label)
        state.count, state.pending = 0, False
        self._pending_bytes -= state.size
        self._admitted[label] = state
        self._fresh += sum(1 for key in state.keys if self._entries[key].fresh)

    def _open_labels(self) -> list[str]:
        return [label for label in self._admitted if label not in self._protected]

    def _open_slots(self) -> int:
        return max(self._bounds.max_labels - len(self._protected), 0)

    def _weight(self, label: str) -> tuple[int, int]:
        state = self._admitted[label]
        return state.seen, state.touched

    # ------------------------------------------------------------------ entries

    def _place(self, state: _Label, key: bytes, entry: _Entry, cap: int) -> None:
        """Reservoir sampling of ``cap`` keys: room, or replace a random held key, or drop."""
        if len(state.keys) < cap:
            state.keys.append(key)
            self._hold(state, key, entry)
            return
        self._dropped("label_cap", 1)
        slot = self._rng.randrange(state.seen)
        if slot < cap:
            self._release(state, state.keys[slot])
            state.keys[slot] = key
            self._hold(state, key, entry)

    def _fit_budget(self) -> None:
        """Take random entries from the admitted label holding the most bytes until the set fits."""
        while self._bytes > self._bounds.max_bytes:
            label, state = max(self._admitted.items(), key=lambda pair: pair[1].size)
            slot = self._rng.randrange(len(state.keys))
            key = state.keys[slot]
            state.keys[slot] = state.keys[-1]
            state.keys.pop()
            self._release(state, key)
            self._dropped("byte_budget", 1)
            if not state.keys:
                self._forget(label)

    def _hold(self, state: _Label, key: bytes, entry: _Entry) -> None:
        self._entries[key] = entry
        state.size += entry.size
        self._bytes += entry.size
        if state.pending:
            self._pending_bytes += entry.size

    def _release(self, state: _Label, key: bytes) -> None:
        entry = self._entries.pop(key)
        state.size -= entry.size
        self._bytes -= entry.size
        if state.pending:
            self._pending_bytes -= entry.size

    def _discard(self, key: bytes, label: str) -> None:
        """Take one entry out (it is being relabelled); a label left empty goes."""
        state = self._admitted.get(label) or self._pending[label]
        state.keys.remove(key)
        self._release(state, key)
        if not state.keys:
            self._forget(label)

    def _drop_label(self, label: str, reason: FeedbackDropReason) -> None:
        state = self._admitted.pop(label, None) or self._pending.pop(label)
        for key in state.keys:
            self._release(state, key)
        self._dropped(reason, len(state.keys))

    def _forget(self, label: str) -> None:
        if self._admitted.pop(label, None) is None:
            del self._pending[label]

    def _dropped(self, reason: FeedbackDropReason, count: int) -> None:
        if self._on_drop is not None and count:
            self._on_drop(reason, count)
