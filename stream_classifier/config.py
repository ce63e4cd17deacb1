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


OAUTHBEARER_REFUSED = (
    "OAUTHBEARER is not supported as kafka.sasl_mechanism: neither client gets a token from these "
    "settings. Use SCRAM-SHA-512 (kafka.sasl_username, kafka.sasl_password). For OAuth/OIDC, use "
    "kafka.transport 'confluent', leave kafka.sasl_mechanism unset and give librdkafka's own "
    "properties in both kafka.consumer_properties and kafka.producer_properties: "
    "sasl.mechanism: OAUTHBEARER, sasl.oauthbearer.method: oidc, sasl.oauthbearer.client.id, "
    "sasl.oauthbearer.client.secret, sasl.oauthbearer.token.endpoint.url (and sasl.oauthbearer.scope "
    "if your provider needs one)"
)


class KafkaSettings(_Section):
    """Where to connect and which topics to use."""

    bootstrap_servers: StrList = Field(
        default_factory=lambda: ["localhost:9092"],
        description="Brokers to bootstrap from (a JSON list or comma-separated).",
    )
    group_id: str = Field(
        default="stream-classifier",
        description="Consumer group; instances sharing it split the input partitions.",
    )
    client_id: str = Field(
        default="stream-classifier", description="Client id the brokers see in their logs and quotas."
    )
    input_topics: StrList = Field(
        default_factory=lambda: ["texts"],
        description="Topics to classify (a JSON list or comma-separated); at least one.",
    )
    output_topic: str = Field(default="predictions", description="Where predictions go.")
    dead_letter_topic: str = Field(
        default="dead-letters",
        description="Where messages that cannot be classified go, with the reason in their headers.",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where a group with no committed offset starts: 'earliest' reads the backlog.",
    )
    transport: Literal["kafka-python", "confluent"] = Field(
        default="kafka-python",
        description="Client library: 'kafka-python', or 'confluent' (librdkafka, the [fast] extra).",
    )
    session_timeout_ms: int = Field(
        default=10_000,
        ge=1_000,
        description="Consumer-group session timeout: a member silent this long loses its partitions.",
    )
    heartbeat_interval_ms: int = Field(
        default=3_000, ge=100, description="Interval of the consumer's group heartbeats."
    )
    max_poll_records: int = Field(default=500, ge=1, description="Most records one poll returns.")
    max_request_size: int = Field(
        default=1_048_576,
        ge=1_024,
        description=(
            "Producer request limit in bytes; an output over it is dead-lettered as 'output_too_large', a "
            "dead letter over it is cut to fit."
        ),
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How the clients talk to the brokers."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description=(
            "SASL mechanism, with a SASL_* security protocol. OAUTHBEARER is refused (its message "
            "says what to use: SCRAM, or librdkafka's OIDC through the pass-through properties)."
        ),
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (a secret: never logged or printed)."
    )
    ssl_cafile: Path | None = Field(
        default=None, description="PEM file of the CA certificates that sign the brokers' certificates."
    )
    ssl_certfile: Path | None = Field(
        default=None, description="PEM file of the client certificate, for brokers that require one."
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="PEM file of the client certificate's private key."
    )
    consumer_properties: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra consumer properties, passed verbatim under the chosen client's own names (JSON in the "
            "environment); secrets among them are masked in logs."
        ),
    )
    producer_properties: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra producer properties, passed verbatim under the chosen client's own names (JSON in the "
            "environment); secrets among them are masked in logs."
        ),
    )

    _split = field_validator("bootstrap_servers", "input_topics", mode="before")(_split_list)

    @field_validator("input_topics")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one input topic is required")
        return value

    @field_validator("sasl_mechanism", mode="before")
    @classmethod
    def _no_oauthbearer(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().upper() == "OAUTHBEARER":
            raise ValueError(OAUTHBEARER_REFUSED)
        return value


class ModelSettings(_Section):
    """Which model to serve and how to run it."""

    path: str | None = Field(
        default=None,
        description="Model directory to serve; with 'retrain.model_store' it seeds an empty store once.",
    )
    device: str = Field(
        default="auto", description="'auto' (CUDA when torch sees a GPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="'auto' is fp16 autocast on CUDA and fp32 on the CPU; bf16 needs a GPU that supports it.",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="'int8' runs the body on ONNX Runtime with int8 weights (CPU only, the [int8] extra).",
    )
    max_seq_length: int | None = Field(
        default=None, ge=8, description="Tokens a text is truncated to; unset: the model's own maximum."
    )
    trusted: bool = Field(
        default=False,
        description=(
            "Unpickle model_head.pkl without restriction (a pickle can run code): only for model directories "
            "you made or trust."
        ),
    )

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

    max_batch_size: int = Field(
        default=64, ge=1, description="A micro-batch is run when it holds this many messages..."
    )
    max_wait_ms: int = Field(
        default=50, ge=0, description="...or this long after its oldest message arrived."
    )
    token_budget: int = Field(
        default=16_384,
        ge=64,
        description="Padded tokens per forward pass; the runtime splits a batch under it.",
    )
    max_in_flight: int = Field(
        default=4_096,
        ge=1,
        description=(
            "Messages consumed and not yet committed, at most; consumption pauses at it. It bounds the "
            "duplicates after a crash (docs/reliability.md)."
        ),
    )


class InputSettings(_Section):
    """How input messages are decoded."""

    format: Literal["json", "text"] = Field(
        default="json",
        description="'json': an object with a text field; 'text': the whole value is UTF-8 text.",
    )
    text_field: str = Field(default="text", description="JSON field that holds the text.")
    id_field: str = Field(
        default="id", description="JSON field that names the message (a string or integer, optional)."
    )
    max_bytes: int = Field(
        default=65_536, ge=1, description="Largest input value; a larger one is dead-lettered as 'too_large'."
    )


class ProcessingSettings(_Section):
    """Delivery guarantee."""

    guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description=(
            "'at_least_once', or 'exactly_once' (Kafka transactions carry outputs and offsets together)."
        ),
    )
    transactional_id_prefix: str = Field(
        default="stream-classifier",
        description="Prefix of each process's transactional id (a random suffix follows), with exactly_once.",
    )
    transactional_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Exactly-once only: this instance's transactional id, stable across restarts, so that a "
            "restarted instance fences the open transaction of its crashed predecessor at once "
            "(read_committed readers would otherwise stall until the broker's transaction timeout). "
            "Default: '<transactional_id_prefix>-<POD_NAME or the host name>'. One id per instance, "
            "not per partition (KIP-447: offsets commit with the group's metadata, which fences a "
            "zombie after a rebalance); two live instances must never share one, so set it when "
            "several instances run on one host."
        ),
    )
    commit_interval_ms: int = Field(
        default=0,
        ge=0,
        description=(
            "At most one commit per interval; 0 commits on every loop turn with progress. Exactly-once "
            "commits a transaction at least 100 ms apart."
        ),
    )
    shutdown_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=300,
        description="On SIGTERM/SIGINT: finish, flush, commit and leave the group within this time.",
    )


class FeedbackSettings(_Section):
    """Labelled feedback topics and the bounded in-memory training set built from them."""

    topics: StrList = Field(
        default_factory=list,
        description=(
            "Labelled feedback topics (a JSON list or comma-separated), read from the beginning at every "
            "start."
        ),
    )
    max_examples_per_label: int = Field(
        default=2_000, ge=1, description="Examples kept per label, by reservoir sampling."
    )
    max_labels: int = Field(default=100, ge=2, description="Label slots of the feedback set.")
    max_bytes: int = Field(
        default=65_536,
        ge=1,
        description="Largest feedback value; a larger one is dead-lettered as 'too_large'.",
    )
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

    enabled: bool = Field(
        default=False,
        description=(
            "Make this process the trainer: it reads feedback, retrains and promotes (one per model store)."
        ),
    )
    interval_s: float = Field(
        default=3_600.0, gt=0, description="A run starts this often when enough new examples arrived."
    )
    min_new_examples: int = Field(
        default=32, ge=1, description="New or relabelled examples a scheduled run needs."
    )
    mode: Literal["full", "head"] = Field(
        default="full",
        description=(
            "'full' fine-tunes the body and fits a new head; 'head' refits the head on cached embeddings."
        ),
    )
    model_store: Path | None = Field(
        default=None,
        description="Directory of model versions and the manifest (a shared volume for several replicas).",
    )
    keep_versions: int = Field(
        default=5, ge=1, description="Versions kept in the store (the current one always)."
    )
    updates_topic: str = Field(
        default="stream-classifier-model-updates",
        description="Compacted topic that announces each promotion to every replica.",
    )
    trusted_eval: str | None = Field(
        default=None,
        description=(
            "A JSONL/CSV file, or 'topic:NAME', the challenger must not score worse on than the champion."
        ),
    )
    holdout_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Share of feedback held out (by hash of the id, or the text) and never trained on.",
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Held-out macro-F1 margin a challenger must beat the champion by (0: a tie does not promote)."
        ),
    )
    min_eval_examples: int = Field(
        default=10, ge=1, description="Held-out examples a run needs; with fewer it is skipped."
    )
    num_iterations: int = Field(
        default=20,
        ge=1,
        description=(
            "Contrastive pair iterations (CPU-sized; the model card's defaults are in TrainingConfig)."
        ),
    )
    epochs: int = Field(default=1, ge=1, description="Training epochs of the body.")
    batch_size: int = Field(default=16, ge=1, description="Training batch size.")
    learning_rate: float = Field(default=2e-5, gt=0, description="Body learning rate.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Cap on body training steps; unset: no cap."
    )
    train_max_seq_length: int = Field(
        default=64,
        ge=8,
        description=(
            "Tokens per text in body training only; evaluation and head embeddings use "
            "'model.max_seq_length'."
        ),
    )
    seed: int = Field(default=42, description="Seed of the pairs, the split and the head fit.")
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="torch threads of the training child process, so that training never starves inference.",
    )
    nice: int = Field(default=10, ge=0, le=19, description="os.nice() of the training child process.")
    max_memory_mb: int | None = Field(
        default=None,
        ge=64,
        description="Address-space cap of the training child (CPU only; a run over it fails cleanly).",
    )
    events_topic: str | None = Field(
        default=None, description="Topic that also receives one JSON record per run (runs are always logged)."
    )
    manifest_poll_s: float = Field(
        default=30.0,
        gt=0,
        description="Replicas re-read the manifest this often, in case they missed an announcement.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token for POST /retrain from non-loopback clients; unset or blank: loopback only."
        ),
    )


class ActiveLearningSettings(_Section):
    """Route uncertain predictions to a review topic."""

    topic: str | None = Field(default=None, description="Review topic for uncertain predictions; unset: off.")
    threshold: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="A prediction whose top probability is below this is copied to the review topic.",
    )
    margin: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="A prediction whose top-two margin is below this is copied to the review topic.",
    )
    max_per_second: float = Field(
        default=10.0,
        gt=0,
        description="Copies per second at most (token bucket); the excess is counted, never the prediction.",
    )


class MetricsSettings(_Section):
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


class LoggingSettings(_Section):
    """Structured JSON logs on stderr."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the JSON log lines on stderr."
    )


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

    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings, description="Where to connect and which topics to use."
    )
    model: ModelSettings = Field(
        default_factory=ModelSettings, description="Which model to serve and how to run it."
    )
    batching: BatchingSettings = Field(
        default_factory=BatchingSettings, description="Micro-batch bounds and the per-pass token budget."
    )
    input: InputSettings = Field(default_factory=InputSettings, description="How input messages are decoded.")
    processing: ProcessingSettings = Field(
        default_factory=ProcessingSettings, description="Delivery guarantee, commits and shutdown."
    )
    feedback: FeedbackSettings = Field(
        default_factory=FeedbackSettings,
        description="Labelled feedback and the bounded training set built from it.",
    )
    retrain: RetrainSettings = Field(
        default_factory=RetrainSettings, description="Retraining, the promotion gate and the model store."
    )
    active_learning: ActiveLearningSettings = Field(
        default_factory=ActiveLearningSettings, description="Uncertain predictions copied to a review topic."
    )
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings, description="The operations HTTP server."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Structured logs.")

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
