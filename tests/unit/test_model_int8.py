"""int8 built once (model/int8.py): the artifact saved with the model or added by the store is
loaded without an export, checked against the body, and rebuilt in memory when stale."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from stream_classifier.cli import main
from stream_classifier.errors import ModelError
from stream_classifier.learn.store import ModelStore
from stream_classifier.model import int8
from stream_classifier.model.format import load_model, save_model
from stream_classifier.model.int8 import ARTIFACT_DIR, ARTIFACT_MODEL, ARTIFACT_SPEC, ensure_artifact
from stream_classifier.model.runtime import ModelRuntime
from tests.fixtures.models import TRAIN_EXAMPLES
from tests.integration.test_model_setfit_interop import setfit_predict_proba

pytest.importorskip("onnxruntime")

TEXTS = [e.text for e in TRAIN_EXAMPLES] + ["ok", "a longer message about a parcel that never came", ""]
SAME_EXPORT = 1e-5  # one body quantised twice gives the same int8 weights


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(load_model(tiny_model_dir), tmp_path_factory.mktemp("int8") / "model", int8=True)


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path) -> np.ndarray:
    """int8 mode's probabilities by the export path (the fixture has no artifact)."""
    assert not (tiny_model_dir / ARTIFACT_DIR).exists()
    return ModelRuntime.load(tiny_model_dir, device="cpu", quantize="int8").predict_proba(TEXTS)


def refuse_export(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the body was exported")

    monkeypatch.setattr(int8, "export_body", refuse)


def count_exports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = int8.export_body

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(int8, "export_body", counted)
    return calls


def int8_events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [r.sc_fields for r in caplog.records if r.getMessage() == event]  # type: ignore[attr-defined]


def reweighted_copy(source: Path, target: Path) -> Path:
    """``source`` copied with one body weight changed (its int8 artifact left as it was)."""
    shutil.copytree(source, target)
    body = SentenceTransformer(str(target), device="cpu")
    with torch.no_grad():
        next(body.parameters()).mul_(1.5)
    body.save(str(target), create_model_card=False)
    return target


def test_a_directory_saved_with_int8_loads_without_an_export(
    int8_dir: Path, exported: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = json.loads((int8_dir / ARTIFACT_DIR / ARTIFACT_SPEC).read_text())
    assert len(spec["body_fingerprint"]) == 64 and spec["format_version"] == 1
    refuse_export(monkeypatch)
    with caplog.at_level(logging.INFO, logger="stream_classifier.model.int8"):
        runtime = ModelRuntime.load(int8_dir, device="cpu", quantize="int8")
    assert [e["source"] for e in int8_events(caplog, "model_int8_body")] == ["artifact"]
    np.testing.assert_allclose(runtime.predict_proba(TEXTS), exported, atol=SAME_EXPORT)
    fp32 = ModelRuntime.load(int8_dir, device="cpu", precision="fp32").predict_proba(TEXTS)
    assert np.abs(runtime.predict_proba(TEXTS) - fp32).max() > 0  # int8 weights, not the fp32 body


def test_the_setfit_files_are_the_same_with_or_without_int8(
    tiny_model_dir: Path, int8_dir: Path, tmp_path: Path
) -> None:
    plain = save_model(load_model(tiny_model_dir), tmp_path / "plain")

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    with_int8 = files(int8_dir)
    assert sorted(k for k in with_int8 if k.startswith(f"{ARTIFACT_DIR}/")) == [
        f"{ARTIFACT_DIR}/{ARTIFACT_MODEL}",
        f"{ARTIFACT_DIR}/{ARTIFACT_SPEC}",
    ]
    assert {k: v for k, v in with_int8.items() if not k.startswith(f"{ARTIFACT_DIR}/")} == files(plain)
    # sentence-transformers (what setfit loads the body with) ignores the extra directory.
    body = SentenceTransformer(str(int8_dir), device="cpu")
    np.testing.assert_allclose(
        body.encode(TEXTS[:3]), SentenceTransformer(str(plain), device="cpu").encode(TEXTS[:3]), atol=1e-6
    )


def test_an_artifact_of_another_body_is_logged_and_the_body_exported(
    int8_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    changed = reweighted_copy(int8_dir, tmp_path / "changed")
    without = tmp_path / "without"
    shutil.copytree(changed, without)
    shutil.rmtree(without / ARTIFACT_DIR)
    want = ModelRuntime.load(without, device="cpu", quantize="int8").predict_proba(TEXTS)
    exports = count_exports(monkeypatch)
    caplog.clear()  # the reference load above logs too when another test raised the level to INFO
    with caplog.at_level(logging.INFO, logger="stream_classifier.model.int8"):
        got = ModelRuntime.load(changed, device="cpu", quantize="int8").predict_proba(TEXTS)
    assert len(exports) == 1
    (stale,) = int8_events(caplog, "model_int8_artifact_stale")
    assert "fingerprint" in stale["reason"]
    assert [e["source"] for e in int8_events(caplog, "model_int8_body")] == ["export"]
    np.testing.assert_allclose(got, want, atol=SAME_EXPORT)
    assert (changed / ARTIFACT_DIR / ARTIFACT_SPEC).is_file()  # loading writes nothing


@pytest.mark.parametrize("damage", ["model", "spec", "format"])
def test_a_damaged_artifact_is_not_used(
    int8_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(int8_dir, copy)
    spec_path = copy / ARTIFACT_DIR / ARTIFACT_SPEC
    if damage == "model":
        with (copy / ARTIFACT_DIR / ARTIFACT_MODEL).open("ab") as handle:
            handle.write(b"\0")
    elif damage == "spec":
        spec_path.write_text("{not json")
    else:
        spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), "format_version": 99}))
    exports = count_exports(monkeypatch)
    ModelRuntime.load(copy, device="cpu", quantize="int8")
    assert len(exports) == 1


def test_ensure_keeps_a_valid_artifact_and_rebuilds_a_stale_one(
    int8_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(int8_dir, copy)
    assert not ensure_artifact(copy)
    changed = reweighted_copy(int8_dir, tmp_path / "changed")
    assert ensure_artifact(changed)
    assert sorted(p.name for p in changed.iterdir() if p.name.startswith(".")) == []  # no leftovers
    refuse_export(monkeypatch)
    ModelRuntime.load(changed, device="cpu", quantize="int8")


def test_saving_with_int8_without_onnxruntime_says_what_to_install(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_model(tiny_model_dir)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ModelError, match=r"stream-classifier\[int8\]"):
        save_model(bundle, tmp_path / "model", int8=True)
    assert not (tmp_path / "model").exists()


def test_an_int8_store_builds_each_version_once(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = ModelStore(tmp_path / "plain")
    assert plain.seed(tiny_model_dir, "v0")
    assert not (plain.current()[1] / ARTIFACT_DIR).exists()  # a store not kept for int8

    store = ModelStore(tmp_path / "store", int8=True)
    assert store.seed(tiny_model_dir, "v0")
    assert (store.current()[1] / ARTIFACT_DIR / ARTIFACT_SPEC).is_file()
    candidate = tmp_path / "staging" / "v1"
    shutil.copytree(tiny_model_dir, candidate)
    store.add_version(candidate, "v1", parent="v0", data_size=12, metrics={}, promote=True)
    assert (store.path_of("v1") / ARTIFACT_DIR / ARTIFACT_SPEC).is_file()

    # An older version without one (made before the store kept int8) gets it when promoted.
    shutil.rmtree(store.path_of("v0") / ARTIFACT_DIR)
    store.promote("v0")
    refuse_export(monkeypatch)
    ModelRuntime.load(store.path_of("v0"), device="cpu", quantize="int8")
    ModelRuntime.load(store.path_of("v1"), device="cpu", quantize="int8")


def test_setfit_loads_a_directory_with_int8(int8_dir: Path, tmp_path: Path) -> None:
    by_setfit = setfit_predict_proba(int8_dir, TEXTS)
    ours = ModelRuntime.load(int8_dir, device="cpu", precision="fp32").predict_proba(TEXTS)
    np.testing.assert_allclose(by_setfit, ours, atol=1e-4)


def test_train_with_int8_saves_the_int8_body(
    tiny_body_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in TRAIN_EXAMPLES))
    output = tmp_path / "model"
    args = [
        "train", "--data", str(data), "--base-model", str(tiny_body_path), "--output", str(output),
        "--num-iterations", "1", "--epochs", "1", "--batch-size", "8", "--max-steps", "1",
        "--device", "cpu", "--int8",
    ]  # fmt: skip
    assert main(args) == 0
    refuse_export(monkeypatch)
    ModelRuntime.load(output, device="cpu", quantize="int8").predict_proba(TEXTS)


def test_an_int8_runtime_is_served_as_int8_in_model_info(int8_dir: Path) -> None:
    from tests.fakes.harness import ServiceRig

    runtime = ModelRuntime.load(int8_dir, device="cpu", quantize="int8")
    rig = ServiceRig(classifier=runtime)  # type: ignore[arg-type]  # a real runtime
    info = {"version": runtime.version, "base_model": runtime.base_model, "device": "cpu"}
    assert runtime.precision == "fp32"  # it computes fp32 around the int8 weights
    assert rig.metric("model_info", **info, precision="int8") == 1
