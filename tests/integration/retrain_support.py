"""Helpers for the retraining integration tests: settings, feedback data, a model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stream_classifier.config import KafkaSettings, Settings
from stream_classifier.learn.store import ModelStore
from stream_classifier.learn.updates import model_version_of
from tests.fixtures.broker import produce

# A class the seed models (billing / shipping / tech) have never seen.
RETURNS = [
    "I want to return this item for a refund",
    "how do I send the product back",
    "can I exchange these shoes for another size",
    "the return label is missing from the box",
    "I would like to send back my order",
    "please arrange a pickup for my return",
    "what is your returns policy",
    "I need to return a damaged jacket",
    "start a return for my recent purchase",
    "can I get a return shipping label",
    "I changed my mind and want to return it",
    "how long do I have to return a product",
    "the item does not fit, I want to return it",
    "return request for order 5521",
    "where do I drop off my return parcel",
    "is the return free of charge",
]

MORE = {
    "billing": [
        "I was billed for a subscription I cancelled",
        "the payment went through twice",
        "my card was charged the wrong price",
        "I need a copy of my invoice",
        "there is an unknown charge on my statement",
        "refund the overcharge on my bill",
        "why did my monthly fee go up",
        "the discount was not applied to my payment",
    ],
    "shipping": [
        "my order is stuck in transit",
        "the tracking number shows no updates",
        "the parcel was delivered to the wrong address",
        "when will my delivery arrive",
        "the package is delayed again",
        "the courier never showed up",
        "my shipment has been lost",
        "delivery was attempted while I was home",
    ],
    "tech": [
        "the app freezes on the login screen",
        "I get an error when I upload a file",
        "the page keeps reloading forever",
        "two factor authentication code never arrives",
        "the software update broke my settings",
        "I cannot reset my password",
        "the mobile app will not start",
        "the website is very slow and times out",
    ],
}

# Clean texts no feedback holds: the trusted evaluation set.
TRUSTED = [
    ("I was charged for something I did not buy", "billing"),
    ("please send me a refund for the double charge", "billing"),
    ("my bill is higher than it should be", "billing"),
    ("the delivery van never came", "shipping"),
    ("my parcel is a week late", "shipping"),
    ("the package tracking is not moving", "shipping"),
    ("the app shows a blank screen", "tech"),
    ("I cannot sign in to the website", "tech"),
    ("the program crashes on startup", "tech"),
]


def feedback_messages(
    pairs: list[tuple[str, str]], *, id_prefix: str | None = None
) -> list[tuple[bytes | None, bytes]]:
    out: list[tuple[bytes | None, bytes]] = []
    for i, (text, label) in enumerate(pairs):
        body: dict[str, Any] = {"text": text, "label": label}
        if id_prefix is not None:
            body["id"] = f"{id_prefix}{i}"
        out.append((None, json.dumps(body).encode()))
    return out


def good_feedback(with_returns: bool = True) -> list[tuple[str, str]]:
    pairs = [(t, label) for label, texts in MORE.items() for t in texts]
    if with_returns:
        pairs += [(t, "returns") for t in RETURNS]
    return pairs


def send_feedback(broker: str, topic: str, pairs: list[tuple[str, str]], **kwargs: Any) -> None:
    produce(broker, topic, feedback_messages(pairs, **kwargs))


def seeded_store(model_dir: Path, root: Path) -> ModelStore:
    store = ModelStore(root)
    store.seed(model_dir, model_version_of(model_dir))
    return store


def learn_settings(
    kafka: KafkaSettings, store: Path, feedback_topic: str, updates_topic: str, **retrain: Any
) -> Settings:
    """Settings of a trainer (or, with ``enabled=False``, a serving replica) using ``store``."""
    values: dict[str, Any] = {
        "enabled": True,
        "model_store": store,
        "updates_topic": updates_topic,
        "mode": "head",
        "interval_s": 1.0,
        "min_new_examples": 1,
        "min_eval_examples": 3,
        "holdout_fraction": 0.25,
        "manifest_poll_s": 2.0,
        "nice": 5,
        "num_iterations": 1,
        "batch_size": 8,
        "max_steps": 2,
        "train_max_seq_length": 32,
    }
    values.update(retrain)
    return Settings(
        kafka=kafka,
        model={"device": "cpu", "precision": "fp32"},
        batching={"max_batch_size": 16, "max_wait_ms": 20},
        metrics={"lag_refresh_s": 1.0},
        feedback={"topics": [feedback_topic]},
        retrain=values,
    )
