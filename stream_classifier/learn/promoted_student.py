"""With ``model.cascade`` on, a promoted version's cascade student is built before it is installed.

:func:`build_promoted_student` runs in the trainer, on the challenger's finished directory,
before the store moves it in and the version is announced: every replica that loads the
version finds its student (serving never builds one: :func:`~.updates.load_serving_runtime`).
The bound is fitted on the run's held-out split. A build that fails is one
``cascade_build_failed`` warning and the promotion goes on without a student (serving then
runs the transformer alone); :func:`~stream_classifier.model.cascade.build_cascade` writes
``student/`` with one rename, so a failed build leaves none behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from stream_classifier.config import Settings
from stream_classifier.model.cascade import build_cascade
from stream_classifier.model.examples import Example
from stream_classifier.ops.logs import log_event

logger = logging.getLogger(__name__)


def build_promoted_student(settings: Settings, model_dir: Path, holdout: Sequence[Example]) -> bool:
    """Build ``model_dir``'s student when ``model.cascade`` is on; True when one was built."""
    if not settings.model.cascade:
        return False
    started = time.perf_counter()
    try:
        student = build_cascade(model_dir, holdout=holdout, trusted=settings.model.trusted)
    except Exception as exc:  # whatever the build fails with, the promotion stands without it
        log_event(
            logger,
            "cascade_build_failed",
            logging.WARNING,
            path=str(model_dir),
            error_type=type(exc).__name__,
            error=str(exc),
        )
        return False
    log_event(
        logger,
        "cascade_built",
        path=str(model_dir),
        bound=student.bound,
        holdout=len(holdout),
        seconds=round(time.perf_counter() - started, 3),
    )
    return True
