"""Structured JSON logging: one line per event.

Library code logs events with :func:`log_event` (an event name plus fields) and never
prints. Only the CLI writes human-facing text to stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "sc_fields"


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: ts, level, logger, event, then the event fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        payload.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, separators=(",", ":"))


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send every ``stream_classifier`` log record to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("stream_classifier")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.Formatter.converter = time.gmtime


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (kept as JSON keys, not formatted into text)."""
    if logger.isEnabledFor(level):
        exc_info = fields.pop("exc_info", None)
        logger.log(level, event, extra={_FIELDS: fields}, exc_info=exc_info)
