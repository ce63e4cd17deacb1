"""The one settings tree of stream-classifier.

Sources, highest priority first: keyword arguments, environment variables
(``STREAM_CLASSIFIER_`` prefix, ``__`` between nesting levels, e.g.
``STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS``), the YAML file given with ``--config``,
then the defaults below. Every value is validated by pydantic; a validation failure is
raised as :class:`~stream_classifier.errors.ConfigError` naming the setting at fault.

Secrets are :class:`pydantic.SecretStr`: they never appear in ``repr``, logs, ``config``
output or metrics.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from stream_classifier.errors import ConfigError

ENV_PREFIX = "STREAM_CLASSIFIER_"


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string for list settings given as text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(_Section):
    """Where to connect and which topics to use."""

    bootstrap_servers: StrList = Field(default_factory=lambda: ["localhost:9092"])
    group_id: str = "stream-classifier"
    client_id: str = "stream-classifier"
    input_topics: StrList = Field(default_factory=lambda: ["texts"])
    output_topic: str = "predictions"
    dead_letter_topic: str = "dead-letters"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    transport: Literal["kafka-python", "confluent"] = "kafka-python"
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_records: int = Field(default=500, ge=1)
    max_request_size: int = Field(default=1_048_576, ge=1_024)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # Passed through verbatim to the transport's consumer / producer (client-specific names).
    consumer_properties: dict[str, Any] = Field(default_factory=dict)
    producer_properties: dict[str, Any] = Field(default_factory=dict)

    _split = field_validator("bootstrap_servers", "input_topics", mode="before")(_split_list)

    @field_validator("input_topics")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one input topic is required")
        return value


class ModelSettings(_Section):
    """Which model to serve and how to run it."""

    path: str | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    quantize: Literal["none", "int8"] = "none"
    max_seq_length: int | None = Field(default=None, ge=8)
    # Allow unrestricted unpickling of model_head.pkl (a pickle can run code): only for
    # model directories you made or trust.
    trusted: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in {"auto", "cpu", "cuda"}:
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class BatchingSettings(_Section):
    """Micro-batch bounds (service) and the per-forward-pass token budget (runtime)."""

    max_batch_size: int = Field(default=64, ge=1)
    max_wait_ms: int = Field(default=50, ge=0)
    token_budget: int = Field(default=16_384, ge=64)
    # Upper bound on messages consumed but not yet committed; consumption pauses above it.
    max_in_flight: int = Field(default=4_096, ge=1)


class InputSettings(_Section):
    """How input messages are decoded."""

    format: Literal["json", "text"] = "json"
    text_field: str = "text"
    id_field: str = "id"
    max_bytes: int = Field(default=65_536, ge=1)


class ProcessingSettings(_Section):
    """Delivery guarantee."""

    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id_prefix: str = "stream-classifier"
    commit_interval_ms: int = Field(default=0, ge=0)
    # Graceful shutdown (SIGTERM/SIGINT): finish, flush, commit and leave within this time.
    shutdown_timeout_s: float = Field(default=20.0, gt=0, le=300)


class FeedbackSettings(_Section):
    """Labelled feedback topics and the bounded in-memory training set built from them."""

    topics: StrList = Field(default_factory=list)
    max_examples_per_label: int = Field(default=2_000, ge=1)
    max_labels: int = Field(default=100, ge=2)
    max_bytes: int = Field(default=65_536, ge=1)
    max_held_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description=(
            "Memory the trainer may spend on held feedback examples (texts, labels and ids as "
            "Python holds them). Pending labels (see 'min_label_examples') hold at most an eighth "
            "of it; over the whole, the label holding the most bytes gives up a random example, "
            "so the labels share the budget."
        ),
    )
    max_label_chars: int = Field(
        default=100,
        ge=1,
        le=1_000,
        description=(
            "Longest feedback label, in characters; a longer one is dead-lettered as 'label_too_long'."
        ),
    )
    min_label_examples: int = Field(
        default=3,
        ge=1,
        description=(
            "Distinct examples a label that the served model does not know (and that is not in "
            "'allowed_labels') needs before it takes a label slot; until then it is pending and "
            "not trained on."
        ),
    )
    allowed_labels: StrList = Field(
        default_factory=list,
        description=(
            "Labels always given a slot without waiting for 'min_label_examples', like the "
            "served model's own labels (a JSON list or comma-separated)."
        ),
    )

    _split = field_validator("topics", "allowed_labels", mode="before")(_split_list)


class RetrainSettings(_Section):
    """Periodic retraining, the promotion gate and the model store."""

    enabled: bool = False
    interval_s: float = Field(default=3_600.0, gt=0)
    min_new_examples: int = Field(default=32, ge=1)
    mode: Literal["full", "head"] = "full"
    model_store: Path | None = None
    keep_versions: int = Field(default=5, ge=1)
    updates_topic: str = "stream-classifier-model-updates"
    trusted_eval: str | None = None
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    min_improvement: float = Field(default=0.0, ge=0)
    min_eval_examples: int = Field(default=10, ge=1)
    # CPU-sized training defaults (the model card's are in TrainingConfig).
    num_iterations: int = Field(default=20, ge=1)
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=2e-5, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    train_max_seq_length: int = Field(default=64, ge=8)
    seed: int = 42
    # Throttling so that training never starves inference on a shared CPU.
    torch_threads: int = Field(default=1, ge=1)
    nice: int = Field(default=10, ge=0, le=19)
    # Address-space cap of the training process (CPU only; a run over it fails cleanly).
    max_memory_mb: int | None = Field(default=None, ge=64)
    # One JSON record per retraining run is also produced here (always logged).
    events_topic: str | None = None
    # Serving replicas re-read the manifest this often, in case they missed an announcement.
    manifest_poll_s: float = Field(default=30.0, gt=0)
    # Bearer token for POST /retrain from non-loopback clients; unset = loopback only.
    api_token: SecretStr | None = None


class ActiveLearningSettings(_Section):
    """Route uncertain predictions to a review topic."""

    topic: str | None = None
    threshold: float = Field(default=0.0, ge=0, le=1)
    margin: float = Field(default=0.0, ge=0, le=1)
    max_per_second: float = Field(default=10.0, gt=0)


class MetricsSettings(_Section):
    """The operations HTTP server: /metrics, /healthz, /readyz."""

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65_535)
    lag_refresh_s: float = Field(default=15.0, gt=0)
    # /healthz fails when the main loop has not ticked for this long.
    liveness_timeout_s: float = Field(default=120.0, gt=0)
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


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class _YamlSource(PydanticBaseSettingsSource):
    """Settings from the YAML file named by ``STREAM_CLASSIFIER_CONFIG_FILE``/``--config``."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of sections")
            self._data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


_config_file: Path | None = None


class Settings(BaseSettings):
    """Root of the settings tree."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    active_learning: ActiveLearningSettings = Field(default_factory=ActiveLearningSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, _config_file))


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        env = ENV_PREFIX + "__".join(str(part).upper() for part in err["loc"])
        lines.append(f"setting '{loc}' (env {env}): {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, the environment and an optional YAML file.

    Raises :class:`ConfigError` naming each setting at fault.
    """
    global _config_file  # noqa: PLW0603 - pydantic-settings sources are built per class call
    if config_file is None and os.environ.get(ENV_PREFIX + "CONFIG_FILE"):
        config_file = os.environ[ENV_PREFIX + "CONFIG_FILE"]
    _config_file = Path(config_file) if config_file is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _config_file = None


# Client property names whose values are secret, in either client's naming: passwords, SASL
# JAAS and OAUTHBEARER configuration and client secrets, PEM key material, tokens. Matched by
# pattern, so that pass-through properties are masked wherever settings are shown.
_SECRET_PROPERTY = re.compile(r"password|secret|jaas|token|credential|pem|oauthbearer\.config|api.?key", re.I)
MASK = "**********"


def is_secret_property(name: str) -> bool:
    """Whether a client property (either client's naming) holds a secret."""
    return _SECRET_PROPERTY.search(name) is not None


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data: secrets, pass-through secret properties included,
    replaced by :data:`MASK`."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for section in ("consumer_properties", "producer_properties"):
        properties = data["kafka"].get(section) or {}
        data["kafka"][section] = {k: (MASK if is_secret_property(k) else v) for k, v in properties.items()}
    return data
