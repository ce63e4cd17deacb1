"""The package's public API: lazy exports that resolve to the real objects."""

import subprocess
import sys

import pytest

import stream_classifier


def test_exports_resolve_to_the_modules_objects() -> None:
    from stream_classifier.model.runtime import ModelRuntime
    from stream_classifier.stream.service import StreamService

    assert stream_classifier.ModelRuntime is ModelRuntime
    assert stream_classifier.StreamService is StreamService
    for name in stream_classifier.__all__:
        assert getattr(stream_classifier, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = stream_classifier.nope


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, stream_classifier, stream_classifier.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
