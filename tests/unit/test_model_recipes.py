"""Training recipes' parts: label anchors and their gate, pairs without (x, x), the P×K
sampler and SupCon loss, the centroid blend folded into the head, the presets."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from stream_classifier.errors import ConfigError, TrainingError
from stream_classifier.model.anchors import anchor_examples, clean_label, zero_shot_gate
from stream_classifier.model.examples import Example
from stream_classifier.model.format import load_body, load_model, save_model
from stream_classifier.model.geometry import add_label_prior, blend_centroid
from stream_classifier.model.pairs import ContrastivePairs
from stream_classifier.model.recipes import RECIPES
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.model.supcon import PKSampler, supcon_loss
from stream_classifier.model.training import TrainingConfig, fit_head, fitted_max_length, train_model
from tests.fixtures.models import TRAIN_EXAMPLES


def _examples(sizes: dict[str, int]) -> list[Example]:
    return [Example(f"{label}-{i}", label) for label, n in sizes.items() for i in range(n)]


# --------------------------------------------------------------------------- anchors


@pytest.mark.parametrize(
    ("label", "cleaned"),
    [
        ("comp.sys.mac.hardware", "mac hardware"),
        ("rec.sport.hockey", "sport hockey"),
        ("talk.politics.mideast", "politics mideast"),
        ("TechSupport", "tech support"),
        ("men-women", "men women"),
        ("billing_issue", "billing issue"),
        ("comp.sys", "comp sys"),  # hierarchy words only: kept
    ],
)
def test_label_names_are_cleaned_to_words(label: str, cleaned: str) -> None:
    assert clean_label(label) == cleaned


def test_anchor_examples_are_one_cleaned_name_per_label() -> None:
    anchors = anchor_examples(["sci.space", "rec.autos", "sci.space"])
    assert anchors == [Example("autos", "rec.autos"), Example("space", "sci.space")]


def test_zero_shot_gate_passes_names_the_body_reads_and_refuses_codes(minilm_path: Path) -> None:
    body = load_body(minilm_path, device="cpu")
    texts = {
        "sports": ["the striker scored twice in the final", "a tennis match went to five sets"],
        "food": ["bake the bread for forty minutes", "a bowl of spicy noodle soup"],
        "weather": ["heavy rain and strong winds tonight", "sunny with a high of thirty degrees"],
    }
    named = [Example(t, label) for label, ts in texts.items() for t in ts]
    decision = zero_shot_gate(body, named)
    assert decision.use and decision.zero_shot_accuracy > decision.bar
    assert decision.bar == pytest.approx(1 / 3 + 2 * math.sqrt((1 / 3) * (2 / 3) / 6), abs=1e-4)
    codes = {"sports": "LABEL_2", "food": "LABEL_0", "weather": "LABEL_1"}
    coded = [Example(e.text, codes[e.label]) for e in named]
    assert not zero_shot_gate(body, coded).use


@pytest.mark.parametrize("labels", [["food", "sports", "weather"], ["food", "sports"]])
def test_the_label_prior_adds_the_names_cosine_to_the_logits(minilm_path: Path, labels: list[str]) -> None:
    body = load_body(minilm_path, device="cpu")
    texts = {"food": "bake the bread", "sports": "the striker scored twice", "weather": "heavy rain tonight"}
    x = np.asarray(
        body.encode([texts[label] for label in labels], normalize_embeddings=True), dtype=np.float64
    )
    plain = fit_head(x, labels)
    notes: dict[str, object] = {}
    prior = add_label_prior(plain, body, 2.0, None, notes)
    names = np.asarray(body.encode(labels, normalize_embeddings=True), dtype=np.float64)
    cosine = x @ names.T
    if len(labels) == 2:  # binary: the one score is class 1's logit minus class 0's
        cosine = cosine[:, 1:] - cosine[:, :1]
    np.testing.assert_allclose(prior.scores(x), plain.scores(x) + 2.0 * cosine, atol=1e-6)
    assert notes == {"label_prior": True}
    assert isinstance(prior.to_sklearn(np.arange(len(labels))), LogisticRegression)  # setfit loads it


def test_a_refusing_gate_leaves_the_head_as_it_was(minilm_path: Path) -> None:
    body = load_body(minilm_path, device="cpu")
    x = np.asarray(body.encode(["a", "b"], normalize_embeddings=True), dtype=np.float64)
    plain = fit_head(x, ["LABEL_0", "LABEL_1"])
    notes: dict[str, object] = {}
    refused = zero_shot_gate(body, [Example("a", "LABEL_0"), Example("b", "LABEL_1")])
    assert add_label_prior(plain, body, 2.0, refused, notes) is plain
    assert notes["label_prior"] is False and "zero_shot_accuracy" in notes["label_prior_gate"]  # type: ignore[operator]


# --------------------------------------------------------------------------- pairs


def test_dropping_self_pairs_keeps_every_other_candidate_once_per_cycle() -> None:
    examples = _examples({"a": 4, "b": 3})
    pairs = ContrastivePairs(examples, sampling_strategy="unique", drop_self_pairs=True)
    produced = list(pairs)
    positives = Counter(frozenset(p[:2]) for p in produced if p[2] == 1.0)
    expected = {
        frozenset((x.text, y.text)) for x, y in itertools.combinations(examples, 2) if x.label == y.label
    }
    assert set(positives) == expected and set(positives.values()) == {1}
    assert all(a != b for a, b, _ in produced)
    assert pairs.positives == 6 + 3
    kept = ContrastivePairs(examples, sampling_strategy="unique")
    assert kept.positives == 10 + 6  # setfit's count, self-pairs included


def test_without_self_pairs_a_label_of_one_needs_a_partner() -> None:
    with pytest.raises(TrainingError, match="two examples"):
        ContrastivePairs(_examples({"a": 1, "b": 1}), drop_self_pairs=True)
    assert len(ContrastivePairs(_examples({"a": 1, "b": 2}), num_iterations=2, drop_self_pairs=True)) == 12


# --------------------------------------------------------------------------- SupCon


def test_pk_batches_are_class_balanced_and_seeded() -> None:
    examples = _examples({"a": 5, "b": 9, "c": 3, "d": 4, "e": 6})
    sampler = PKSampler(examples, texts_per_batch=12, seed=3)
    assert (sampler.p, sampler.k) == (3, 3)  # K at most the smallest label's 3
    batches = list(itertools.islice(iter(sampler), 50))
    for batch in batches:
        assert len(batch) == len(set(batch)) == 9
        counts = Counter(examples[i].label for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {3}
    seen = Counter(examples[i].label for batch in batches for i in batch)
    assert max(seen.values()) <= 1.2 * min(seen.values())  # labels take turns
    assert batches == list(itertools.islice(iter(PKSampler(examples, 12, seed=3)), 50))
    assert batches != list(itertools.islice(iter(PKSampler(examples, 12, seed=4)), 50))


def test_pk_sampler_needs_two_of_every_label() -> None:
    with pytest.raises(TrainingError, match="two examples of every label"):
        PKSampler(_examples({"a": 1, "b": 4}), 8)


def test_supcon_loss_is_khoslas_and_rewards_clusters() -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    t = 0.5
    zn = torch.nn.functional.normalize(z, dim=1)
    expected = []
    for i in range(6):
        others = [a for a in range(6) if a != i]
        denominator = torch.logsumexp(torch.stack([zn[i] @ zn[a] / t for a in others]), 0)
        positives = [p for p in others if labels[p] == labels[i]]
        expected.append(-sum(zn[i] @ zn[p] / t - denominator for p in positives) / len(positives))
    assert supcon_loss(z, labels, t).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    clustered = torch.eye(3).repeat_interleave(2, dim=0) + 0.01 * torch.randn(6, 3)
    assert supcon_loss(clustered, labels, t) < supcon_loss(torch.randn(6, 3), labels, t)


# --------------------------------------------------------------------------- centroid head


def _clusters(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 16))
    x = np.concatenate([c + 0.8 * rng.normal(size=(n, 16)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [f"c{i}" for i in range(k) for _ in range(n)]


@pytest.mark.parametrize("k", [2, 4])
def test_centroid_weight_one_is_nearest_centroid_by_centred_cosine(k: int) -> None:
    x, labels = _clusters(k, 10)
    head = blend_centroid(fit_head(x, labels), x, labels, weight=1.0, temperature=0.1)
    mu = x.mean(axis=0)
    y = np.asarray(labels)
    centroids = np.stack([(x[y == c] - mu).mean(axis=0) for c in head.classes])
    queries = np.random.default_rng(1).normal(size=(40, 16))
    centred = queries - mu
    cosine = (centred @ centroids.T) / np.linalg.norm(centred, axis=1, keepdims=True)
    cosine /= np.linalg.norm(centroids, axis=1)
    expected = np.asarray(head.classes)[np.argmax(cosine, axis=1)]
    got = np.asarray(head.classes)[np.argmax(head.predict_proba(queries), axis=1)]
    assert (got == expected).all()


def test_centroid_blend_folds_into_an_ordinary_logistic_head() -> None:
    x, labels = _clusters(3, 8)
    plain = fit_head(x, labels)
    assert blend_centroid(plain, x, labels, weight=0.0, temperature=0.1) is plain
    blended = blend_centroid(plain, x, labels, weight=0.5, temperature=0.1)
    assert blended.coef.shape == plain.coef.shape and blended.classes == plain.classes
    lr = blended.to_sklearn(np.arange(3))
    assert isinstance(lr, LogisticRegression)  # what setfit unpickles
    np.testing.assert_allclose(lr.predict_proba(x), blended.predict_proba(x), atol=1e-9)


# --------------------------------------------------------------------------- presets and training


def test_recipes_are_presets_and_setfit_is_plain_setfit() -> None:
    base = {"num_iterations": 20, "epochs": 1, "seed": 3}
    plain = TrainingConfig(**base, recipe="setfit")
    assert plain.model_dump() == TrainingConfig(**base).model_dump()
    fast = TrainingConfig(**base, recipe="fast")
    assert fast.drop_self_pairs and fast.fit_max_length
    assert not TrainingConfig(**base, recipe="fast", fit_max_length=False).fit_max_length  # explicit wins
    assert TrainingConfig(**fast.model_dump()) == fast  # a saved config reads back as it was
    with pytest.raises(ConfigError, match="unknown training recipe 'best'"):
        TrainingConfig(recipe="best")
    assert TrainingConfig(**base, recipe="centroid").body_key() == plain.body_key()  # other head only
    assert TrainingConfig(**base, recipe="names").body_key() == plain.body_key()
    assert fast.body_key() != plain.body_key()


def test_fitted_max_length_follows_short_texts_only(tiny_body_path: Path) -> None:
    body = load_body(tiny_body_path, device="cpu")
    assert fitted_max_length(body, ["short text", "a few words here"], 64) == 16
    assert fitted_max_length(body, ["word " * 200], 64) == 64


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_saves_and_loads(recipe: str, tiny_body_path: Path, tmp_path: Path) -> None:
    config = TrainingConfig(
        recipe=recipe, num_iterations=1, epochs=1, batch_size=4, max_steps=3, show_progress_bar=False
    )
    bundle = train_model(TRAIN_EXAMPLES, tiny_body_path, config, device="cpu")
    assert bundle.metadata.params["recipe"] == recipe
    assert bundle.metadata.params["body"]["steps"] == 3
    if config.label_anchors == "gated":  # a random body reads no names: the gate refuses
        assert bundle.metadata.params["recipe_notes"]["anchors"] is False
    if config.label_prior == "gated":
        assert bundle.metadata.params["recipe_notes"]["label_prior"] is False
    loaded = load_model(save_model(bundle, tmp_path / "model"))
    texts = [e.text for e in TRAIN_EXAMPLES[:5]]
    before = ModelRuntime(bundle, device="cpu", precision="fp32").predict_proba(texts)
    after = ModelRuntime(loaded, device="cpu", precision="fp32").predict_proba(texts)
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_retrain_recipe_setting_names_every_recipe() -> None:
    from typing import get_args

    from stream_classifier.config import RetrainSettings

    assert set(get_args(RetrainSettings.model_fields["recipe"].annotation)) == set(RECIPES)
    assert RetrainSettings().recipe == "setfit"
