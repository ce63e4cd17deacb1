"""The promotion gate against poisoned feedback, with the real broker and the real MiniLM.

The feedback's labels are rotated (billing -> shipping -> tech -> billing): the held-out
part is poisoned the same way, so a challenger that learns the poison *beats* the champion
there. Only the trusted evaluation set (a file, or a topic) catches it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from stream_classifier.learn.learning import retrain_once
from stream_classifier.ops.metrics import Metrics
from stream_classifier.transport import make_transport
from tests.fixtures.broker import produce
from tests.integration.retrain_support import (
    TRUSTED,
    good_feedback,
    learn_settings,
    seeded_store,
    send_feedback,
)

pytestmark = pytest.mark.integration

ROTATE = {"billing": "shipping", "shipping": "tech", "tech": "billing"}


@pytest.mark.parametrize("trusted_source", ["file", "topic"])
def test_poisoned_feedback_is_rejected_by_the_trusted_set(
    trusted_source: str, *, broker: str, topic_factory, kafka_settings, minilm_model_dir: Path, tmp_path: Path
) -> None:
    feedback, updates = topic_factory("fb"), topic_factory("upd")
    store = seeded_store(minilm_model_dir, tmp_path / "store")
    seed_version = store.current()[0]
    if trusted_source == "file":
        trusted_file = tmp_path / "trusted.jsonl"
        trusted_file.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in TRUSTED))
        trusted = str(trusted_file)
    else:
        topic = topic_factory("trusted")
        produce(broker, topic, [(None, json.dumps({"text": t, "label": lab}).encode()) for t, lab in TRUSTED])
        trusted = f"topic:{topic}"
    poisoned = [(text, ROTATE[label]) for text, label in good_feedback(with_returns=False)]
    send_feedback(broker, feedback, poisoned)
    settings = learn_settings(kafka_settings(), store.root, feedback, updates, trusted_eval=trusted)
    metrics = Metrics(CollectorRegistry())

    record = retrain_once(settings, metrics, make_transport(settings.kafka), force=True)

    assert record.outcome == "rejected", record
    scores = record.scores
    # The poisoned held-out split alone would have promoted it ...
    assert scores["challenger"]["holdout"]["macro_f1"] > scores["champion"]["holdout"]["macro_f1"]
    # ... the trusted set did not.
    assert record.reason.startswith("trusted-set")
    assert scores["challenger"]["trusted"]["accuracy"] < scores["champion"]["trusted"]["accuracy"]
    assert store.current()[0] == seed_version
    assert [e.version for e in store.read().versions] == [seed_version]
    runs = metrics.registry.get_sample_value("stream_classifier_retrain_runs_total", {"outcome": "rejected"})
    assert runs == 1
    # ece and log-loss are recorded for both roles and both splits, in the record and the gauge.
    for role in ("champion", "challenger"):
        for split in ("holdout", "trusted"):
            for metric in ("ece", "log_loss"):
                labels = {"role": role, "split": split, "metric": metric}
                gauge = metrics.registry.get_sample_value("stream_classifier_retrain_score", labels)
                assert gauge == pytest.approx(scores[role][split][metric])
    assert "trusted ece" in record.reason
