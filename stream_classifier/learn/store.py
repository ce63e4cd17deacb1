"""The model store: model versions as directories, and the manifest that names the current one.

Layout under ``retrain.model_store`` (a local directory or a shared mounted volume)::

    manifest.json          {"format": 1, "current": VERSION, "versions": [...], "trainer": {...}}
    versions/VERSION/      one saved model directory per version
    staging/               work directories of training runs (never read by replicas)
    .lock                  advisory lock serialising manifest updates

Invariants:

- ``manifest.json`` is the source of truth for the current version. It is only ever
  replaced whole (written to a temporary file, fsynced, then ``os.replace``), so a reader
  sees the old or the new manifest, never a torn one;
- every read-modify-write of the manifest holds an exclusive ``flock`` on ``.lock``, so
  the trainer and a ``models promote`` never lose each other's update;
- a version directory is complete before the manifest names it (it is moved into
  ``versions/`` with one rename), and it is never modified afterwards, save one addition:
  a store kept for int8 serving (``int8=True``) gives every version its int8 body
  (:func:`~stream_classifier.model.int8.ensure_artifact`) before it is installed, and
  adds it whole (one rename) to an older version that lacks it when that is promoted;
- at most ``keep_versions`` versions are kept; the current one is never pruned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stream_classifier.errors import ModelStoreError

MANIFEST = "manifest.json"
_FORMAT = 1
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class VersionEntry:
    """One version as the manifest records it."""

    version: str
    path: str  # relative to the store root
    parent: str | None
    created_at: float
    data_size: int
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = "retrain"  # "seed" for the model the store started from

    @staticmethod
    def from_json(data: dict[str, Any]) -> VersionEntry:
        return VersionEntry(
            version=str(data["version"]),
            path=str(data["path"]),
            parent=data.get("parent"),
            created_at=float(data["created_at"]),
            data_size=int(data.get("data_size", 0)),
            metrics=dict(data.get("metrics") or {}),
            source=str(data.get("source", "retrain")),
        )


@dataclass
class Manifest:
    """The parsed ``manifest.json``."""

    current: str
    versions: list[VersionEntry]
    # The trainer's progress through the feedback topics ("topic:partition" -> next offset).
    feedback_offsets: dict[str, int] = field(default_factory=dict)

    def entry(self, version: str) -> VersionEntry:
        for entry in self.versions:
            if entry.version == version:
                return entry
        known = ", ".join(e.version for e in self.versions) or "none"
        raise ModelStoreError(f"version {version!r} is not in the model store (known: {known})")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "current": self.current,
            "versions": [asdict(e) for e in self.versions],
            "trainer": {"feedback_offsets": self.feedback_offsets},
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Manifest:
        trainer = data.get("trainer") or {}
        return Manifest(
            current=str(data["current"]),
            versions=[VersionEntry.from_json(v) for v in data["versions"]],
            feedback_offsets={str(k): int(v) for k, v in (trainer.get("feedback_offsets") or {}).items()},
        )


def check_version_name(version: str) -> str:
    """``version`` if it is safe as a directory name; else :class:`ModelStoreError`."""
    if not _VERSION_RE.match(version):
        raise ModelStoreError(f"invalid model version {version!r}: use letters, digits, '.', '_' and '-'")
    return version


class ModelStore:
    """The versions and manifest under ``root``; see the module docstring for invariants."""

    def __init__(self, root: Path, keep_versions: int = 5, *, int8: bool = False) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.int8 = int8  # build each version's int8 body once, here, not in every replica

    # ------------------------------------------------------------------ reading
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read(self) -> Manifest:
        """The manifest as it is now; :class:`ModelStoreError` if absent or unreadable."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            return Manifest.from_json(data)
        except FileNotFoundError:
            raise ModelStoreError(
                f"the model store {self.root} has no {MANIFEST}: start the trainer (or `serve`) with "
                "STREAM_CLASSIFIER_MODEL__PATH set once to seed it"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelStoreError(
                f"cannot read {self.manifest_path}: {exc}; restore it from a backup"
            ) from exc

    def path_of(self, version: str) -> Path:
        """The directory of ``version`` (which must be in the manifest)."""
        return self.root / self.read().entry(version).path

    def current(self) -> tuple[str, Path]:
        """The current version and its directory."""
        manifest = self.read()
        return manifest.current, self.root / manifest.entry(manifest.current).path

    def staging_dir(self, prefix: str) -> Path:
        """A fresh work directory on the store's filesystem (so a finished model moves by rename)."""
        staging = self.root / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=staging))

    # ------------------------------------------------------------------ writing
    def _ensure_int8(self, model_dir: Path) -> None:
        """With ``int8``, give ``model_dir`` its int8 body unless it has a valid one (the export's
        torch work on a passing thread: the trainer's thread lives on, and so would its CPU pool)."""
        if self.int8:
            from stream_classifier.model.int8 import ensure_artifact  # noqa: PLC0415 - torch, only here
            from stream_classifier.model.runtime import on_a_passing_thread  # noqa: PLC0415

            on_a_passing_thread(lambda: ensure_artifact(model_dir))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, manifest: Manifest) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(manifest.to_json(), handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.manifest_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def seed(
        self, model_dir: Path, version: str, *, data_size: int = 0, metrics: dict[str, Any] | None = None
    ) -> bool:
        """Start the store from ``model_dir`` (copied in) unless it already has a manifest.

        Returns whether it seeded. Safe against two processes seeding at once.
        """
        check_version_name(version)
        with self._locked():
            if self.exists():
                return False
            if not Path(model_dir).is_dir():
                raise ModelStoreError(f"cannot seed the model store from {model_dir}: not a directory")
            work = self.staging_dir("seed-")
            shutil.copytree(model_dir, work / "model")
            self._ensure_int8(work / "model")
            entry = self._install(
                work / "model",
                version,
                parent=None,
                data_size=data_size,
                metrics=metrics or {},
                source="seed",
            )
            shutil.rmtree(work, ignore_errors=True)
            self._write(Manifest(current=version, versions=[entry]))
            return True

    def _install(
        self,
        model_dir: Path,
        version: str,
        *,
        parent: str | None,
        data_size: int,
        metrics: dict[str, Any],
        source: str,
    ) -> VersionEntry:
        relative = f"versions/{check_version_name(version)}"
        target = self.root / relative
        if target.exists():
            raise ModelStoreError(f"version {version} already exists in {self.root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(model_dir, target)
        return VersionEntry(
            version=version,
            path=relative,
            parent=parent,
            created_at=time.time(),
            data_size=data_size,
            metrics=metrics,
            source=source,
        )

    def add_version(
        self,
        model_dir: Path,
        version: str,
        *,
        parent: str | None,
        data_size: int,
        metrics: dict[str, Any],
        promote: bool,
        feedback_offsets: dict[str, int] | None = None,
    ) -> VersionEntry:
        """Move the finished ``model_dir`` in as ``version`` and record it (current if ``promote``)."""
        self._ensure_int8(model_dir)  # before the lock: an export takes seconds
        with self._locked():
            manifest = self.read()
            entry = self._install(
                model_dir, version, parent=parent, data_size=data_size, metrics=metrics, source="retrain"
            )
            manifest.versions.append(entry)
            if promote:
                manifest.current = version
            if feedback_offsets is not None:
                manifest.feedback_offsets = dict(feedback_offsets)
            doomed = self._prune(manifest)
            # The manifest stops naming a version before its directory goes (crash-safe order).
            self._write(manifest)
            for old in doomed:
                shutil.rmtree(self.root / old.path, ignore_errors=True)
            return entry

    def promote(self, version: str) -> VersionEntry:
        """Make ``version`` current (a rollback when it is older)."""
        if self.int8 and self.path_of(version).is_dir():
            self._ensure_int8(self.path_of(version))
        with self._locked():
            manifest = self.read()
            entry = manifest.entry(version)
            if not (self.root / entry.path).is_dir():
                raise ModelStoreError(f"version {version} is in the manifest but {entry.path} is missing")
            manifest.current = version
            self._write(manifest)
            return entry

    def record_progress(self, feedback_offsets: dict[str, int]) -> None:
        """Remember how far the trainer has read the feedback topics (a run that promoted nothing)."""
        with self._locked():
            manifest = self.read()
            manifest.feedback_offsets = dict(feedback_offsets)
            self._write(manifest)

    def _prune(self, manifest: Manifest) -> list[VersionEntry]:
        """Drop the oldest entries beyond ``keep_versions`` (never the current one); return them."""
        excess = len(manifest.versions) - self.keep_versions
        by_age = sorted(manifest.versions, key=lambda e: e.created_at)
        doomed = [e for e in by_age if e.version != manifest.current][: max(excess, 0)]
        for entry in doomed:
            manifest.versions.remove(entry)
        return doomed

    def clear_staging(self) -> None:
        """Remove work directories left by a trainer that stopped mid-run (trainer start only)."""
        shutil.rmtree(self.root / "staging", ignore_errors=True)
