"""stream-classifier: few-shot SetFit text classification over Kafka streams.

The public Python API, imported lazily so that ``stream-classifier --help`` and ``config``
do not pay for torch:

- :class:`ModelRuntime` — text -> probabilities (``stream_classifier.model.runtime``);
- :func:`load_model` / :func:`save_model` — setfit-compatible model directories;
- :func:`train_model` and :class:`TrainingConfig` — SetFit training;
- :class:`StreamService` — the serving loop (``stream_classifier.stream.service``);
- :func:`load_settings` / :class:`Settings` — the settings tree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the static view of the lazy exports below
    from stream_classifier.config import Settings, load_settings
    from stream_classifier.model.format import load_model, save_model
    from stream_classifier.model.runtime import ModelRuntime
    from stream_classifier.model.training import TrainingConfig, train_model
    from stream_classifier.stream.service import StreamService

__version__ = "0.1.0"

_EXPORTS = {
    "ModelRuntime": "stream_classifier.model.runtime",
    "load_model": "stream_classifier.model.format",
    "save_model": "stream_classifier.model.format",
    "train_model": "stream_classifier.model.training",
    "TrainingConfig": "stream_classifier.model.training",
    "StreamService": "stream_classifier.stream.service",
    "load_settings": "stream_classifier.config",
    "Settings": "stream_classifier.config",
}
__all__ = [
    "ModelRuntime",
    "Settings",
    "StreamService",
    "TrainingConfig",
    "__version__",
    "load_model",
    "load_settings",
    "save_model",
    "train_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stream_classifier' has no attribute {name!r}")
