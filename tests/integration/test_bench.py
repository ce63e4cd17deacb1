"""`stream-classifier bench`: every stage runs against the real broker and the figures add up.

Speed itself is never asserted here (docs/performance.md holds the figures); these tests check
that one run measures every stage, that the pipeline published every message, and that the
ratios are computed from the stages of that run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from stream_classifier.bench import BenchOptions, ratios, run_bench, write_results
from stream_classifier.errors import ConfigError
from stream_classifier.samples import build_random_body

TOKENIZER = Path(__file__).resolve().parents[2] / "benchmarks" / "tokenizer"


def test_ratios_come_from_the_stages_of_one_run() -> None:
    stages = {
        "bare": {"msg_per_s": 100.0},
        "naive": {"msg_per_s": 40.0},
        "pipeline[kafka-python]": {"msg_per_s": 90.0},
        "pipeline[confluent]": {"msg_per_s": 0.0},  # a stage that measured nothing: no ratio
        "setfit": {"msg_per_s": 50.0},
        "precision": {
            "fp32": {"msg_per_s": 80.0, "accuracy": 0.9},
            "int8": {"msg_per_s": 150.0, "accuracy": 0.885},
            "bf16": {"skipped": "not on this device"},
            "stage_seconds": 12.0,
        },
    }
    assert ratios(stages) == {
        "pipeline[kafka-python]/bare": 0.9,
        "pipeline[kafka-python]/naive": 2.25,
        "int8/fp32": 1.88,
        "int8_accuracy_delta_points": -1.5,
        "bare/setfit": 2.0,
    }


def test_the_pipeline_is_compared_with_the_bare_rate_measured_around_it() -> None:
    stages = {
        "bare": {"msg_per_s": 100.0},
        "pipeline[kafka-python]": {"msg_per_s": 90.0, "bare_before": 95.0, "bare_after": 105.0},
        "pipeline[confluent]": {"msg_per_s": 90.0, "bare_before": 80.0, "bare_after": 120.0},
    }
    found = ratios(stages)
    assert found["pipeline[kafka-python]/bare"] == 0.9
    assert found["pipeline[confluent]/bare"] == 0.9
    stages["pipeline[confluent]"] = {"msg_per_s": 90.0, "bare_before": 80.0}  # one side only
    assert ratios(stages)["pipeline[confluent]/bare"] == 0.9  # the bare stage's rate then


def test_random_bodies_have_their_arch_shape(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    body = SentenceTransformer(str(build_random_body("tiny", TOKENIZER, tmp_path / "tiny")), device="cpu")
    assert body.encode(["a short text"]).shape == (1, 32)
    with pytest.raises(ConfigError, match="random body shape must be one of"):
        build_random_body("huge", TOKENIZER, tmp_path / "huge")


@pytest.mark.timeout(300)
def test_a_quick_run_measures_every_stage(broker: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(
        output=tmp_path / "bench.json",
        quick=True,
        device="cpu",
        precisions=("fp32", "int8"),
        transports=("kafka-python",),
        model=tiny_model_dir,
        bootstrap_servers=broker,
        messages=300,
        batch_sizes=(1, 32),
        stages=("bare", "precision", "pipeline", "naive", "latency"),
    )
    out = io.StringIO()
    results = run_bench(options, out)
    write_results(results, options.output)

    stages = results.stages
    assert stages["bare"]["best_batch"] in (1, 32) and stages["bare"]["msg_per_s"] > 0
    precision = stages["precision"]
    assert len(precision["fp32"]["rounds"]) == len(precision["int8"]["rounds"]) == 3
    assert 0 < precision["int8"]["max_prob_diff_vs_fp32"] <= 0.1
    pipeline = stages["pipeline[kafka-python]"]
    assert pipeline["published"] == 300 and "incomplete" not in pipeline
    assert pipeline["bare_before"] > 0 and pipeline["bare_after"] > 0
    assert results.ratios["pipeline[kafka-python]/bare"] == round(
        pipeline["msg_per_s"] / ((pipeline["bare_before"] + pipeline["bare_after"]) / 2), 3
    )
    naive = stages["naive"]
    assert naive["messages"] > 0 and 0 < naive["model_seconds"] < naive["seconds"]
    latency = stages["latency"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert set(results.ratios) >= {
        "pipeline[kafka-python]/bare",
        "pipeline[kafka-python]/naive",
        "int8/fp32",
        "int8_accuracy_delta_points",
    }
    written = json.loads(options.output.read_text())
    assert written["stages"].keys() == stages.keys() and written["ratios"] == results.ratios
    assert "[bench] pipeline[kafka-python]:" in out.getvalue()
