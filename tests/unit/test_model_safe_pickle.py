"""The restricted head unpickler: what real heads pickle loads; crafted pickles are refused.

Every crafted pickle is loaded in a fresh interpreter, so that one that still makes numpy
dereference a forged pointer fails its test (return code -11) instead of killing the suite.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from joblib.numpy_pickle import NumpyArrayWrapper
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from stream_classifier.model.safe_pickle import Captured, load_restricted

REPO = Path(__file__).resolve().parents[2]
RAW = b"A" * 8  # read as a pointer, this is 0x4141414141414141
_RECONSTRUCT = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
_SCALAR = np._core.multiarray.scalar  # type: ignore[attr-defined]


class Reduce:
    """Pickles as ``func(*args)``, then BUILD ``state`` when one is given."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def forged_dtype(spelling: str, state: tuple[Any, ...]) -> Reduce:
    """``numpy.dtype(spelling)`` whose BUILD sets ``state`` (numpy's own writes are checked)."""
    return Reduce(np.dtype, (spelling, False, True), state)


OBJECT_FLAGS_CLEARED = forged_dtype("O8", (3, "|", None, None, None, -1, -1, 0))
OBJECT_FIELD = forged_dtype("V8", (3, "|", None, ("p",), {"p": (np.dtype("O"), 0)}, 8, 1, 0))


def set_state_array(dtype: Any, data: Any, shape: tuple[int, ...] = (1,)) -> Reduce:
    """An array as numpy pickles one: ``_reconstruct(ndarray, (0,), b'b')`` then ``__setstate__``."""
    return Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


def head_with(**attributes: Any) -> LogisticRegression:
    """A fitted-looking LogisticRegression with ``attributes`` set; the others are plain lists, so
    that a plain pickle of it holds no numpy global but the hostile ones."""
    model = LogisticRegression()
    model.__dict__.update(
        {"classes_": [0, 1, 2], "coef_": [[1.0] * 4] * 3, "intercept_": [0.0] * 3, **attributes}
    )
    return model


def object_array(*items: Any) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def joblib_wrapper_file(path: Path, dtype: Any, raw: bytes, **changes: Any) -> Path:
    """A joblib file of one array: the wrapper's pickled fields (``changes`` applied), then ``raw``."""
    wrapper = NumpyArrayWrapper.__new__(NumpyArrayWrapper)
    wrapper.__dict__.update(
        {"subclass": np.ndarray, "shape": (len(raw) // 8,), "order": "C", "dtype": dtype, "allow_mmap": False}
    )
    wrapper.__dict__.update(changes)
    stream = pickle.dumps(wrapper, protocol=3)  # no frames: the array bytes go between BUILD and STOP
    assert stream.endswith(b"b.")
    path.write_bytes(stream[:-1] + raw + b".")
    return path


def _plain(obj: Any) -> Any:
    """Pickle ``obj`` with the standard pickler (joblib reads plain pickles too)."""
    return lambda path: path.write_bytes(pickle.dumps(obj, protocol=4))


def _joblib(obj: Any) -> Any:
    return lambda path: joblib.dump(obj, path)


def _wrapper(dtype: Any, raw: bytes, **changes: Any) -> Any:
    return lambda path: joblib_wrapper_file(path, dtype, raw, **changes)


HOSTILE: dict[str, tuple[Any, str]] = {
    # numpy.ndarray called with a buffer: an object array over raw bytes (SIGSEGV when read)
    "ndarray(object dtype, raw bytes)": (
        _plain(head_with(classes_=Reduce(np.ndarray, ((1,), np.dtype("O"), RAW)))),
        "numpy.ndarray",
    ),
    "ndarray(float, buffer, strides)": (
        _plain(head_with(coef_=Reduce(np.ndarray, ((1 << 20,), np.dtype("f8"), RAW, 0, (0,))))),
        "numpy.ndarray",
    ),
    "_reconstruct + setstate(object, raw bytes)": (
        _plain(head_with(classes_=set_state_array(np.dtype("O"), RAW))),
        "_reconstruct",
    ),
    "_reconstruct + dtype with object flags cleared": (
        _plain(head_with(classes_=set_state_array(OBJECT_FLAGS_CLEARED, RAW))),
        "_reconstruct",
    ),
    "_reconstruct + dtype with an object field": (
        _plain(head_with(classes_=set_state_array(OBJECT_FIELD, RAW))),
        "_reconstruct",
    ),
    "frombuffer(object dtype)": (
        _plain(head_with(classes_=Reduce(np.frombuffer, (RAW, np.dtype("O"))))),
        "frombuffer",
    ),
    "scalar(object dtype)": (_plain(head_with(C=Reduce(_SCALAR, (np.dtype("O"), RAW)))), "object"),
    "scalar(dtype with object flags cleared)": (
        _plain(head_with(C=Reduce(_SCALAR, (OBJECT_FLAGS_CLEARED, RAW)))),
        "dtype",
    ),
    "scalar(float, short bytes)": (_plain(head_with(C=Reduce(_SCALAR, (np.dtype("f8"), b"A")))), "bytes"),
    "joblib wrapper, dtype with object flags cleared": (_wrapper(OBJECT_FLAGS_CLEARED, RAW * 2), "dtype"),
    "joblib wrapper, dtype with an object field": (_wrapper(OBJECT_FIELD, RAW), "dtype"),
    "joblib wrapper, complex dtype": (_wrapper(np.dtype("c16"), RAW * 2), "dtype"),
    "joblib wrapper, datetime dtype": (_wrapper(np.dtype("M8[s]"), RAW), "dtype"),
    "joblib wrapper, structured dtype": (_wrapper(np.dtype([("a", "<f8")]), RAW), "dtype"),
    "joblib wrapper, object dtype over raw bytes": (
        _wrapper(np.dtype("O"), RAW),
        "not a readable joblib head pickle",
    ),
    "joblib wrapper, negative shape": (_wrapper(np.dtype("f8"), RAW, shape=(-1,)), "shape"),
    "joblib wrapper, shape over the bound": (
        _wrapper(np.dtype("f8"), RAW, shape=(1 << 40, 1 << 20)),
        "shape",
    ),
    "joblib wrapper, zero-width strings over the bound": (
        _wrapper(np.dtype("U0"), b"", shape=(1 << 31,)),
        "shape",
    ),
    "joblib wrapper, matrix subclass": (_wrapper(np.dtype("f8"), RAW, subclass=np.matrix), "numpy.matrix"),
    "joblib wrapper, unknown field": (_wrapper(np.dtype("f8"), RAW, read=1), "'read'"),
    "joblib object array holding a forged array": (
        _joblib(head_with(classes_=object_array("a", set_state_array(OBJECT_FLAGS_CLEARED, RAW), "c"))),
        "dtype",
    ),
    "joblib object array holding a numeric array": (
        _joblib(head_with(classes_=object_array("a", np.zeros(2), "c"))),
        "_frombuffer",
    ),
    "joblib object array holding a container": (
        _joblib(head_with(classes_=object_array("a", ["b"], "c"))),
        "list",
    ),
    "sklearn attribute named like a method": (_plain(head_with(__setstate__="x")), "__setstate__"),
}

_LOAD_IN_A_SUBPROCESS = """
import sys
from pathlib import Path
from stream_classifier.errors import ModelError
from stream_classifier.model.safe_pickle import load_restricted
try:
    loaded = load_restricted(Path(sys.argv[1]))
except ModelError as exc:
    print("REFUSED", exc)
    sys.exit(0)
print("LOADED", repr(vars(loaded) if hasattr(loaded, "__dict__") else loaded))  # reads every array
sys.exit(3)
"""


@pytest.mark.parametrize("case", list(HOSTILE))
def test_crafted_pickle_is_refused_without_crashing(case: str, tmp_path: Path) -> None:
    write, message = HOSTILE[case]
    path = tmp_path / "model_head.pkl"
    write(path)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_SUBPROCESS, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stdout}\n{done.stderr[-2000:]}"
    assert done.stdout.startswith("REFUSED"), done.stdout
    assert message in done.stdout


def _fit(model: Any, k: int = 3, labels: Any = None) -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = np.arange(30) % k
    return model.fit(x, y if labels is None else np.asarray(labels, dtype=object)[y])


def _same_state(loaded: Any, model: Any) -> None:
    assert isinstance(loaded, Captured)
    assert type(loaded).kind == type(model).__name__
    for key in ("classes_", "coef_", "intercept_"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(model, key))
        assert getattr(loaded, key).dtype == getattr(model, key).dtype


@pytest.mark.parametrize("compress", [0, 3])
def test_setfits_joblib_head_loads_as_plain_data(tmp_path: Path, compress: int) -> None:
    """setfit saves ``joblib.dump(LogisticRegression)`` with integer classes."""
    model = _fit(LogisticRegression())
    joblib.dump(model, tmp_path / "h.pkl", compress=compress)
    _same_state(load_restricted(tmp_path / "h.pkl"), model)


def test_string_and_object_classes_load(tmp_path: Path) -> None:
    strings = _fit(LogisticRegression(), labels=["billing", "shipping", "tech"])
    strings.classes_ = strings.classes_.astype(str)  # '<U8'
    objects = _fit(LogisticRegression(), labels=["billing", "shipping", "tech"])  # object dtype
    objects.feature_names_in_ = object_array("f0", "f1", "f2", "f3")
    assert strings.classes_.dtype.kind == "U" and objects.classes_.dtype == object
    for model in (strings, objects):
        joblib.dump(model, tmp_path / "h.pkl")
        _same_state(load_restricted(tmp_path / "h.pkl"), model)
    assert list(load_restricted(tmp_path / "h.pkl").feature_names_in_) == ["f0", "f1", "f2", "f3"]


def test_one_vs_rest_head_loads_with_its_estimators(tmp_path: Path) -> None:
    model = _fit(OneVsRestClassifier(LogisticRegression()))
    joblib.dump(model, tmp_path / "h.pkl")
    loaded = load_restricted(tmp_path / "h.pkl")
    assert type(loaded).kind == "OneVsRestClassifier"
    assert type(loaded.label_binarizer_).kind == "LabelBinarizer"
    for got, want in zip(loaded.estimators_, model.estimators_, strict=True):
        _same_state(got, want)


def test_big_endian_arrays_and_numpy_scalars_load(tmp_path: Path) -> None:
    model = _fit(LogisticRegression())
    model.coef_ = model.coef_.astype(">f8")
    model.C = np.float64(0.5)
    model.n_iter_ = np.array([7], dtype=np.int32)
    joblib.dump(model, tmp_path / "h.pkl")
    loaded = load_restricted(tmp_path / "h.pkl")
    np.testing.assert_array_equal(loaded.coef_, model.coef_)
    assert loaded.C == 0.5 and isinstance(loaded.C, np.float64)
    assert loaded.n_iter_.tolist() == [7]


_LOAD_HEADS_IN_A_SUBPROCESS = """
import sys
from pathlib import Path
from stream_classifier.errors import ModelError
from stream_classifier.model.format import load_head
for directory in sys.argv[1:]:
    print("CASE", directory, flush=True)
    try:
        head, _ = load_head(Path(directory))
    except ModelError as exc:
        print("REFUSED", exc, flush=True)
    else:
        print("LOADED", head.classes, head.coef.sum(), flush=True)
"""


def test_model_directories_with_crafted_heads_are_refused(tmp_path: Path) -> None:
    """Through the path every model directory takes (``format.load_head``), in one interpreter."""
    directories = []
    for number, (write, _) in enumerate(HOSTILE.values()):
        directory = tmp_path / f"model-{number}"
        directory.mkdir()
        write(directory / "model_head.pkl")
        directories.append(str(directory))
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_HEADS_IN_A_SUBPROCESS, *directories],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stdout}\n{done.stderr[-2000:]}"
    outcomes = [line for line in done.stdout.splitlines() if not line.startswith("CASE")]
    assert len(outcomes) == len(HOSTILE)
    for directory, outcome in zip(directories, outcomes, strict=True):
        assert outcome.startswith(f"REFUSED {directory}/model_head.pkl: "), outcome
