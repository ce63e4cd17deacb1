"""The restricted reader of ``model_head.pkl``: a joblib pickle of a scikit-learn head, read as data.

It resolves a short allowlist of globals, each to a stand-in of ours; the real numpy
constructors and ``__setstate__`` methods are never handed to the pickle, because a
crafted dtype state (an object field, object flags cleared) or an object array over raw
bytes makes numpy dereference pointers the file chose (SIGSEGV, or worse).

- ``sklearn.*`` ``LogisticRegression``, ``OneVsRestClassifier``, ``LabelBinarizer``:
  :class:`Captured` stand-ins that keep the pickled attributes and run nothing;
- ``joblib.numpy_pickle.NumpyArrayWrapper``: joblib's array record; the array's bytes
  follow it in the file;
- ``numpy.dtype``: only the plain dtypes (bool, integers, float16/32/64, fixed-width str
  and bytes; object only as below), with exactly the state numpy itself pickles for them;
- ``numpy.ndarray``: a name only (joblib records it as the array class); calling it is refused;
- numpy's ``scalar``: numbers and strings of a plain dtype from exactly their bytes;
- numpy's ``_reconstruct``: only inside joblib's object-array path, a nested pickle of
  one object array, whose items must be str, int, float, bool or plain numpy scalars.

Invariants: every array this reader builds has a plain dtype (object only on joblib's
object-array path), at most :data:`MAX_ARRAY_DIMS` dimensions and at most
:data:`MAX_ARRAY_BYTES` bytes. What it refuses raises :class:`UnsafeModelError` before
anything refused is called; a setfit differentiable head raises :class:`ModelError` with
:data:`CONVERT_SETFIT_HEAD_HELP`; a corrupt file raises :class:`ModelError`.
"""

from __future__ import annotations

import math
import pickle
import re
import reprlib
from pathlib import Path
from typing import IO, Any

import numpy as np
from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler, _validate_fileobject_and_memmap

from stream_classifier.errors import ModelError, UnsafeModelError

MAX_ARRAY_BYTES = 1 << 30
"""Largest array a head pickle may hold, in bytes, counting at least one byte an item (a
3,000-class head over 4,096-d embeddings is 98 MB)."""
MAX_ARRAY_DIMS = 8
"""Most dimensions an array in a head pickle may have (a head's arrays are 1-d or 2-d)."""

CONVERT_SETFIT_HEAD_HELP = (
    "this model has a setfit differentiable head (SetFitHead), which stream-classifier cannot "
    "read without the setfit package. Convert it once, where setfit is installed: load it with "
    "SetFitModel.from_pretrained(DIR) and replace model_head with a LogisticRegression whose "
    "coef_/intercept_ are model_head.linear's weight/bias and classes_ = numpy.arange(k) (exact "
    "for out_features > 1 and temperature 1), then save it; or retrain with a LogisticRegression "
    "head (see docs/models.md)"
)

# numpy's own spelling of the plain dtypes in a pickle (``np.dtype(x).__reduce__()[1][0]``).
_PLAIN_DTYPE = re.compile(r"b1|[iu][1248]|f[248]|[US][0-9]{1,10}|O8")
_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")


def _refuse(what: str) -> UnsafeModelError:
    return UnsafeModelError(f"{what}, which the safe head reader does not build")


def _shown(value: object) -> str:
    return reprlib.repr(value)


# --------------------------------------------------------------------------- stand-ins


class Captured:
    """Stand-in for a scikit-learn class: keeps the pickled attributes, runs nothing.

    ``type(obj).kind`` names the class stood in for. Attribute names are strings and never
    dunder names (which would shadow the stand-in's own methods).
    """

    kind = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise _refuse(f"a {self.kind} whose state is a {type(state).__name__}")
        for key in state:
            if not isinstance(key, str) or key.startswith("__"):
                raise _refuse(f"a {self.kind} attribute named {_shown(key)}")
        self.__dict__.update(state)


class _CapturedLogisticRegression(Captured):
    kind = "LogisticRegression"


class _CapturedOneVsRest(Captured):
    kind = "OneVsRestClassifier"


class _CapturedLabelBinarizer(Captured):
    kind = "LabelBinarizer"


_SKLEARN_STANDINS: dict[str, type[Captured]] = {
    cls.kind: cls for cls in (_CapturedLogisticRegression, _CapturedOneVsRest, _CapturedLabelBinarizer)
}


class _NdarrayName:
    """Stands for ``numpy.ndarray`` where a pickle names the array class; never constructs one."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        raise _refuse("numpy.ndarray called directly (an array over bytes the file chose)")


_NDARRAY = _NdarrayName()


class _PickledDtype:
    """``numpy.dtype(spelling, align, copy)`` from a pickle, for a plain spelling only.

    Its BUILD state must equal the state numpy pickles for that dtype (in either byte
    order); :attr:`dtype` is then the real dtype, built by us from the spelling.
    """

    __slots__ = ("dtype",)

    def __init__(self, spelling: object, align: object = False, copy: object = True) -> None:
        if not isinstance(spelling, str) or not _PLAIN_DTYPE.fullmatch(spelling) or align not in (False, 0):
            raise _refuse(f"numpy dtype {_shown(spelling)}")
        self.dtype = np.dtype(spelling)

    def __setstate__(self, state: Any) -> None:
        for candidate in (self.dtype.newbyteorder("<"), self.dtype.newbyteorder(">")):
            if state == candidate.__reduce__()[2]:
                self.dtype = candidate
                return
        raise _refuse(f"numpy dtype {self.dtype.str} with the pickled state {_shown(state)}")


def _dtype_of(value: object) -> np.dtype[Any]:
    if not isinstance(value, _PickledDtype):
        raise _refuse(f"an array or scalar whose dtype is a {type(value).__name__}")
    return value.dtype


def _checked_shape(shape: object, dtype: np.dtype[Any]) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_ARRAY_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise _refuse(f"an array of shape {_shown(shape)}")
    if math.prod(shape) * max(dtype.itemsize, 1) > MAX_ARRAY_BYTES:
        raise _refuse(
            f"an array of shape {_shown(shape)} and dtype {dtype.str} (over {MAX_ARRAY_BYTES} bytes)"
        )
    return shape


def _scalar(dtype: object, data: object = None) -> np.generic:
    """numpy's ``scalar(dtype, bytes)`` for a plain, non-object dtype and exactly its bytes."""
    plain = _dtype_of(dtype)
    if plain.hasobject:
        raise _refuse("a numpy scalar of object dtype")
    if not isinstance(data, bytes) or len(data) != plain.itemsize:
        raise _refuse(f"a numpy {plain.str} scalar from {_shown(data)} (not {plain.itemsize} bytes)")
    value: np.generic = np.frombuffer(data, dtype=plain, count=1)[0]
    return value


_PLAIN_ITEMS = (str, int, float, np.bool_, np.number, np.str_, np.bytes_)


class _PickledObjectArray:
    """What numpy's ``_reconstruct`` returns in joblib's object-array pickle: its BUILD state
    ``(1, shape, dtype, fortran, items)`` becomes :attr:`array`, an object array of plain items."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray[Any, Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None or not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise _refuse(f"a numpy array state {_shown(state)}")
        _, shape, dtype, fortran, items = state
        plain = _dtype_of(dtype)
        if not plain.hasobject:
            raise _refuse(f"a {plain.str} array inside joblib's object-array record")
        shape = _checked_shape(shape, plain)
        if not isinstance(fortran, bool) or not isinstance(items, list) or len(items) != math.prod(shape):
            raise _refuse(f"an object array of shape {_shown(shape)} from {_shown(items)}")
        for item in items:
            if not isinstance(item, _PLAIN_ITEMS):
                raise _refuse(f"an object array holding a {type(item).__name__}")
        array = np.empty(len(items), dtype=object)
        array[:] = items
        self.array = array.reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls: object, shape: object, typecode: object) -> _PickledObjectArray:
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``, the start of every pickled array."""
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _refuse(f"numpy _reconstruct({_shown(cls)}, {_shown(shape)}, {_shown(typecode)})")
    return _PickledObjectArray()


_NUMPY_NAMES: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): _PickledDtype,
    ("numpy", "ndarray"): _NDARRAY,
    **{(module, "scalar"): _scalar for module in _NUMPY_MULTIARRAY},
}
_OBJECT_ARRAY_NAMES: dict[tuple[str, str], Any] = {
    **_NUMPY_NAMES,
    **{(module, "_reconstruct"): _reconstruct for module in _NUMPY_MULTIARRAY},
}


def _refused_global(module: str, name: str) -> ModelError:
    if name == "SetFitHead" or module.startswith("setfit"):
        return ModelError(CONVERT_SETFIT_HEAD_HELP)
    return UnsafeModelError(f"needs {module}.{name}, which the safe head reader does not allow")


# --------------------------------------------------------------------------- unpicklers


class _ObjectArrayUnpickler(pickle.Unpickler):
    """joblib's nested pickle of one object array: numpy names only, no estimators."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _OBJECT_ARRAY_NAMES:
            return _OBJECT_ARRAY_NAMES[module, name]
        raise _refused_global(module, name)


def _load_object_array(handle: IO[bytes], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    loaded = _ObjectArrayUnpickler(handle).load()
    if not isinstance(loaded, _PickledObjectArray) or loaded.array is None or loaded.array.shape != shape:
        raise _refuse(f"joblib's object-array record holding {type(loaded).__name__}")
    return loaded.array


class _SafeArrayWrapper(NumpyArrayWrapper):  # type: ignore[misc]
    """joblib's array record with every field checked; object arrays go through
    :class:`_ObjectArrayUnpickler`, never through memory maps or array subclasses."""

    _REQUIRED = frozenset({"subclass", "shape", "order", "dtype", "allow_mmap"})
    _FIELDS = _REQUIRED | {"numpy_array_alignment_bytes"}  # absent before joblib 1.2

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not self._REQUIRED <= state.keys() <= self._FIELDS:
            fields = sorted(map(_shown, state)) if isinstance(state, dict) else type(state).__name__
            raise _refuse(f"a joblib array record with the fields {fields}")
        if state["subclass"] is not _NDARRAY:
            raise _refuse(f"a joblib array of class {_shown(state['subclass'])}")
        alignment = state.get("numpy_array_alignment_bytes")
        if state["order"] not in ("C", "F") or not (alignment is None or type(alignment) is int):
            raise _refuse(f"a joblib array in order {_shown(state['order'])}, aligned {_shown(alignment)}")
        self.subclass = np.ndarray
        self.dtype = _dtype_of(state["dtype"])
        self.shape = _checked_shape(state["shape"], self.dtype)
        self.order = state["order"]
        self.allow_mmap = False
        self.numpy_array_alignment_bytes = alignment

    def read(self, unpickler: Any, ensure_native_byte_order: Any) -> Any:
        if self.dtype.hasobject:
            return _load_object_array(unpickler.file_handle, self.shape)
        return self.read_array(unpickler, ensure_native_byte_order)


_MAIN_NAMES: dict[tuple[str, str], Any] = {
    **_NUMPY_NAMES,
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): _SafeArrayWrapper,
}


class _RestrictedNumpyUnpickler(NumpyUnpickler):  # type: ignore[misc]
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("sklearn.") and name in _SKLEARN_STANDINS:
            return _SKLEARN_STANDINS[name]
        if (module, name) in _MAIN_NAMES:
            return _MAIN_NAMES[module, name]
        raise _refused_global(module, name)


def load_restricted(path: Path) -> Any:
    """Unpickle the joblib (or plain) pickle at ``path`` under the restriction above.

    Raises :class:`UnsafeModelError` naming what it refused, or :class:`ModelError`.
    """
    try:
        with path.open("rb") as handle, _validate_fileobject_and_memmap(handle, str(path), None) as (fobj, _):
            if isinstance(fobj, str):  # joblib < 0.10 companion-file format
                raise ModelError("joblib's format older than 0.10 is not supported: re-save the head")
            return _RestrictedNumpyUnpickler(str(path), fobj, "auto").load()
    except ModelError:
        raise
    except Exception as exc:  # a corrupt pickle fails in many ways (struct, EOF, value, memory, ...)
        raise ModelError(f"not a readable joblib head pickle ({exc})") from None
