"""Operations: the ops HTTP server and the logs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stream_classifier.config.base import Section


class MetricsSettings(Section):
    """The operations HTTP server: /metrics, /healthz, /readyz."""

    host: str = Field(default="0.0.0.0", description="Address the ops HTTP server binds.")
    port: int = Field(
        default=8000,
        ge=0,
        le=65_535,
        description="Port of /metrics, /healthz, /readyz and POST /retrain (0: any free port).",
    )
    lag_refresh_s: float = Field(default=15.0, gt=0, description="How often consumer lag is read.")
    liveness_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description=(
            "/healthz fails when the main loop has not ticked for this long (never while it waits on the "
            "broker)."
        ),
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "Deadline of one ops HTTP connection, counted from its accept: the client sends its "
            "request and reads the answer within it, or the connection is closed."
        ),
    )
    max_connections: int = Field(
        default=64,
        ge=1,
        le=4_096,
        description=(
            "Ops HTTP connections held while their request head arrives (one server thread reads "
            "them all); a new connection beyond this closes the oldest such one."
        ),
    )
    max_handlers: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "Complete ops HTTP requests answered at once, one thread each; a request beyond this "
            "is answered 503 at once."
        ),
    )


class LoggingSettings(Section):
    """Structured JSON logs on stderr."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the JSON log lines on stderr."
    )
