"""The model store: seeding, versions, manifest, promotion (rollback), pruning."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from stream_classifier.errors import ModelStoreError
from stream_classifier.learn.store import MANIFEST, ModelStore


def _model_dir(tmp_path: Path, name: str) -> Path:
    """A directory standing for a saved model (the store moves directories; it never opens them)."""
    d = tmp_path / "work" / name
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(name.encode())
    return d


def _seeded(tmp_path: Path, keep: int = 5) -> ModelStore:
    store = ModelStore(tmp_path / "store", keep_versions=keep)
    assert store.seed(_model_dir(tmp_path, "seed"), "v0", data_size=16)
    return store


def test_seed_copies_the_model_once(tmp_path: Path) -> None:
    store = _seeded(tmp_path)
    assert not store.seed(_model_dir(tmp_path, "other"), "v9")
    version, path = store.current()
    assert version == "v0"
    assert (path / "weights.bin").read_bytes() == b"seed"
    assert (tmp_path / "work" / "seed").is_dir()  # the source is copied, not moved
    entry = store.read().entry("v0")
    assert entry.source == "seed"
    assert entry.parent is None
    assert entry.data_size == 16


def test_reading_an_unseeded_store_says_how_to_seed_it(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="MODEL__PATH"):
        ModelStore(tmp_path / "empty").read()


def test_add_version_records_parent_metrics_size_and_time(tmp_path: Path) -> None:
    store = _seeded(tmp_path)
    entry = store.add_version(
        _model_dir(tmp_path, "v1"),
        "v1",
        parent="v0",
        data_size=40,
        metrics={"holdout": {"macro_f1": 0.9}},
        promote=True,
        feedback_offsets={"fb:0": 12},
    )
    manifest = store.read()
    assert manifest.current == "v1"
    assert manifest.feedback_offsets == {"fb:0": 12}
    assert manifest.entry("v1") == entry
    assert entry.parent == "v0"
    assert entry.metrics == {"holdout": {"macro_f1": 0.9}}
    assert entry.created_at >= manifest.entry("v0").created_at
    assert (store.root / "versions" / "v1" / "weights.bin").read_bytes() == b"v1"
    raw = json.loads((store.root / MANIFEST).read_text())
    assert {v["version"] for v in raw["versions"]} == {"v0", "v1"}


def test_unpromoted_version_is_kept_but_not_current(tmp_path: Path) -> None:
    store = _seeded(tmp_path)
    store.add_version(_model_dir(tmp_path, "v1"), "v1", parent="v0", data_size=1, metrics={}, promote=False)
    assert store.current()[0] == "v0"


def test_promote_rolls_back_and_refuses_unknown_versions(tmp_path: Path) -> None:
    store = _seeded(tmp_path)
    store.add_version(_model_dir(tmp_path, "v1"), "v1", parent="v0", data_size=1, metrics={}, promote=True)
    store.promote("v0")
    assert store.current()[0] == "v0"
    with pytest.raises(ModelStoreError, match="not in the model store"):
        store.promote("nope")


def test_keeps_last_k_versions_but_never_the_current(tmp_path: Path) -> None:
    store = _seeded(tmp_path, keep=2)
    store.add_version(_model_dir(tmp_path, "v1"), "v1", parent="v0", data_size=1, metrics={}, promote=True)
    store.promote("v0")  # current is now the oldest
    store.add_version(_model_dir(tmp_path, "v2"), "v2", parent="v0", data_size=1, metrics={}, promote=False)
    assert [e.version for e in store.read().versions] == ["v0", "v2"]
    assert not (store.root / "versions" / "v1").exists()
    assert (store.root / "versions" / "v0").is_dir()


def test_version_names_must_be_safe_directory_names(tmp_path: Path) -> None:
    store = _seeded(tmp_path)
    with pytest.raises(ModelStoreError, match="invalid model version"):
        store.add_version(
            _model_dir(tmp_path, "x"), "../evil", parent="v0", data_size=1, metrics={}, promote=True
        )


def test_manifest_writes_are_atomic_under_concurrent_readers(tmp_path: Path) -> None:
    store = _seeded(tmp_path, keep=100)
    stop = threading.Event()
    errors: list[Exception] = []

    def read_forever() -> None:
        while not stop.is_set():
            try:
                store.read()
            except Exception as exc:  # any torn read fails the test
                errors.append(exc)

    reader = threading.Thread(target=read_forever)
    reader.start()
    for i in range(1, 30):
        store.add_version(
            _model_dir(tmp_path, f"v{i}"), f"v{i}", parent="v0", data_size=i, metrics={}, promote=True
        )
    stop.set()
    reader.join()
    assert errors == []
    assert not list(store.root.glob(".manifest-*"))
    assert store.current()[0] == "v29"


def test_concurrent_writers_do_not_lose_updates(tmp_path: Path) -> None:
    store = _seeded(tmp_path, keep=100)
    other = ModelStore(store.root, keep_versions=100)

    def add(s: ModelStore, names: list[str]) -> None:
        for n in names:
            s.add_version(_model_dir(tmp_path, n), n, parent="v0", data_size=1, metrics={}, promote=False)

    a = threading.Thread(target=add, args=(store, [f"a{i}" for i in range(15)]))
    b = threading.Thread(target=add, args=(other, [f"b{i}" for i in range(15)]))
    a.start()
    b.start()
    a.join()
    b.join()
    assert len(store.read().versions) == 31
