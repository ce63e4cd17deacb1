"""SetFit training: contrastive pairs with setfit's semantics (lazily), head fit, growing labels."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stream_classifier.errors import TrainingError
from stream_classifier.model.examples import Example
from stream_classifier.model.format import load_model
from stream_classifier.model.pairs import ContrastivePairs, _unrank_triangle
from stream_classifier.model.training import (
    TrainingConfig,
    _decay_groups,
    _linear_warmup_schedule,
    fine_tune_body,
    fit_head,
    pair_loss,
    train_model,
)
from tests.fixtures.models import TRAIN_EXAMPLES


def _examples(sizes: dict[str, int]) -> list[Example]:
    return [Example(f"{label}-{i}", label) for label, n in sizes.items() for i in range(n)]


def _setfit_candidates(examples: list[Example]) -> tuple[Counter[frozenset[str]], Counter[frozenset[str]]]:
    """setfit's candidates: every (i, j) with i <= j (combinations with replacement)."""
    positives: Counter[frozenset[str]] = Counter()
    negatives: Counter[frozenset[str]] = Counter()
    for a, b in itertools.combinations_with_replacement(examples, 2):
        (positives if a.label == b.label else negatives)[frozenset((a.text, b.text))] += 1
    return positives, negatives


def test_unrank_triangle_enumerates_the_upper_triangle() -> None:
    for n in range(1, 40):
        pairs = [_unrank_triangle(k, n) for k in range(n * (n + 1) // 2)]
        assert pairs == [(a, b) for a in range(n) for b in range(a, n)]


@pytest.mark.parametrize(
    ("strategy", "num_iterations"),
    [("oversampling", None), ("undersampling", None), ("unique", None), ("oversampling", 3)],
)
def test_pair_counts_and_labels_match_setfit(strategy: str, num_iterations: int | None) -> None:
    examples = _examples({"a": 5, "b": 2, "c": 3})
    positives, negatives = _setfit_candidates(examples)
    p, n = sum(positives.values()), sum(negatives.values())
    expected = {
        "oversampling": (max(p, n), max(p, n)),
        "undersampling": (min(p, n), min(p, n)),
        "unique": (p, n),
    }[strategy]
    if num_iterations:
        expected = (num_iterations * len(examples),) * 2
    pairs = ContrastivePairs(examples, sampling_strategy=strategy, num_iterations=num_iterations)  # type: ignore[arg-type]
    produced = list(pairs)
    assert len(produced) == len(pairs) == sum(expected)
    assert (sum(t == 1.0 for *_, t in produced), sum(t == 0.0 for *_, t in produced)) == expected
    label_of = {e.text: e.label for e in examples}
    alternating = 2 * min(expected)
    for index, (left, right, target) in enumerate(produced):
        if index < alternating:
            assert target == (1.0 if index % 2 == 0 else 0.0)  # alternate while both sides last
        assert (label_of[left] == label_of[right]) == (target == 1.0)


@pytest.mark.parametrize(
    ("strategy", "positives", "negatives"),
    # setfit 1.x's own expectations (tests/test_sampler.py::test_sentence_pairs_generation) for
    # three sentences labelled ("label 1", "label 1", "label 2").
    [("unique", 4, 2), ("undersampling", 2, 2), ("oversampling", 4, 4)],
)
def test_pair_counts_are_setfits_own(strategy: str, positives: int, negatives: int) -> None:
    examples = [Example("sent 1", "label 1"), Example("sent 2", "label 1"), Example("sent 3", "label 2")]
    pairs = ContrastivePairs(examples, sampling_strategy=strategy)  # type: ignore[arg-type]
    assert (pairs.positives, pairs.negatives) == (positives, negatives)
    assert len(list(pairs)) == positives + negatives


def test_each_cycle_visits_every_candidate_once() -> None:
    examples = _examples({"a": 6, "b": 3})
    positives, negatives = _setfit_candidates(examples)
    pairs = list(ContrastivePairs(examples, sampling_strategy="oversampling"))
    produced_pos = Counter(frozenset(p[:2]) for p in pairs[0::2])
    produced_neg = Counter(frozenset(p[:2]) for p in pairs[1::2])
    assert sum(positives.values()) == 27 and sum(negatives.values()) == 18
    assert produced_pos == positives  # the larger side: exactly once each
    first_cycle = Counter(frozenset(p[:2]) for p in pairs[1::2][:18])
    assert first_cycle == negatives  # the smaller side cycles: once each per pass
    assert sum(produced_neg.values()) == 27


def test_pairs_are_seeded_and_lazy() -> None:
    examples = _examples({"a": 4, "b": 4})
    first = list(ContrastivePairs(examples, seed=1))
    assert first == list(ContrastivePairs(examples, seed=1))
    assert first != list(ContrastivePairs(examples, seed=2))
    # 40,000 examples: 8e8 candidate pairs, which setfit would build in memory.
    big = _examples({"a": 20_000, "b": 20_000})
    pairs = ContrastivePairs(big, num_iterations=1)
    assert len(pairs) == 80_000
    head = list(itertools.islice(iter(pairs), 6))
    assert [p[2] for p in head] == [1.0, 0.0] * 3


def test_one_label_is_a_training_error() -> None:
    with pytest.raises(TrainingError, match="two labels"):
        ContrastivePairs(_examples({"a": 3}))
    with pytest.raises(TrainingError, match="two labels"):
        train_model(_examples({"a": 3}), "unused")


def test_warmup_then_linear_decay() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = _linear_warmup_schedule(optimizer, warmup_steps=2, total_steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_fit_head_sorts_classes_and_separates_clusters() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(loc=c, size=(10, 4)) for c in (-3, 0, 3)])
    labels = ["z"] * 10 + ["a"] * 10 + ["m"] * 10
    head = fit_head(x, labels, seed=42)
    assert head.classes == ["a", "m", "z"]
    assert (np.array(head.classes)[head.predict_proba(x).argmax(1)] == labels).mean() > 0.9


def test_default_config_is_the_model_card() -> None:
    config = TrainingConfig()
    assert (config.batch_size, config.epochs, config.num_iterations) == (16, 3, 40)
    assert (config.sampling_strategy, config.body_learning_rate, config.seed) == ("oversampling", 2e-5, 42)
    assert (config.warmup_proportion, config.loss, config.use_amp) == (0.153, "cosine", True)
    # setfit's l2_weight default, and the transformers Trainer's max_grad_norm that setfit keeps
    assert (config.weight_decay, config.max_grad_norm) == (0.01, 1.0)


def test_weight_decay_spares_biases_and_layer_norms_as_the_transformers_trainer_does(
    tiny_model_dir: Path,
) -> None:
    from transformers.trainer_pt_utils import get_parameter_names

    body = load_model(tiny_model_dir).body
    decay, plain = _decay_groups(body, 0.01)
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.01, 0.0)
    names = {id(parameter): name for name, parameter in body.named_parameters()}
    # The Trainer's own rule (Trainer.get_decay_parameter_names, transformers 5.x).
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    expected = set(get_parameter_names(body, [torch.nn.LayerNorm], patterns))
    assert {names[id(p)] for p in decay["params"]} == expected
    assert len(decay["params"]) + len(plain["params"]) == len(names)
    assert plain["params"]  # the tiny BERT has biases and LayerNorms


def test_gradient_norm_is_clipped_before_the_optimiser_step(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad.norm() for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    for clip in (None, 1e-3):
        config = TrainingConfig(
            num_iterations=1, max_steps=1, batch_size=8, max_grad_norm=clip, show_progress_bar=False
        )
        fine_tune_body(load_model(tiny_model_dir).body, TRAIN_EXAMPLES, config, torch.device("cpu"))
    unclipped, clipped = seen
    assert unclipped > 1e-2
    assert clipped == pytest.approx(1e-3, rel=1e-3)


def test_retraining_with_a_grown_label_set(tiny_model_dir: Path) -> None:
    parent = load_model(tiny_model_dir)
    grown = [
        *TRAIN_EXAMPLES,
        Example("I love your product", "praise"),
        Example("great service, thanks", "praise"),
    ]
    config = TrainingConfig(num_iterations=1, max_steps=2, batch_size=8, show_progress_bar=False)
    bundle = train_model(grown, tiny_model_dir, config, device="cpu")
    assert bundle.labels == ["billing", "praise", "shipping", "tech"]
    assert bundle.metadata.parent_version == parent.version
    assert bundle.metadata.version != parent.version
    assert bundle.metadata.training_data.n == len(grown)
    assert bundle.metadata.params["body"]["steps"] == 2
    assert bundle.examples == grown


def test_training_from_a_bundle_leaves_it_untouched(tiny_model_dir: Path) -> None:
    parent = load_model(tiny_model_dir)
    before = [p.detach().clone() for p in parent.body.parameters()]
    config = TrainingConfig(num_iterations=1, max_steps=2, batch_size=8, show_progress_bar=False)
    child = train_model(TRAIN_EXAMPLES, parent, config, device="cpu")
    assert child.metadata.parent_version == parent.version
    assert all(torch.equal(a, b) for a, b in zip(before, parent.body.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, child.body.parameters(), strict=True))


def test_pair_losses_match_sentence_transformers() -> None:
    from sentence_transformers.losses import SiameseDistanceMetric

    similarity = torch.tensor([0.9, 0.2, 0.7, -0.1])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    cosine = pair_loss(similarity, target, TrainingConfig())
    assert cosine.item() == pytest.approx(torch.mean((similarity - target) ** 2).item())
    distance = SiameseDistanceMetric.COSINE_DISTANCE
    a, b = (
        torch.nn.functional.normalize(torch.randn(4, 8), dim=1),
        torch.nn.functional.normalize(torch.randn(4, 8), dim=1),
    )
    d = distance(a, b)
    expected = 0.5 * (target * d.pow(2) + (1 - target) * torch.relu(0.5 - d).pow(2))
    got = pair_loss(torch.cosine_similarity(a, b), target, TrainingConfig(loss="contrastive"))
    assert got.item() == pytest.approx(expected.mean().item(), abs=1e-6)
