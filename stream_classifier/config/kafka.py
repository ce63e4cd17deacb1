"""Where to connect, which topics to use, and how the clients authenticate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from stream_classifier.config.base import Section, StrList, split_list

OAUTHBEARER_REFUSED = (
    "OAUTHBEARER is not supported as kafka.sasl_mechanism: neither client gets a token from these "
    "settings. Use SCRAM-SHA-512 (kafka.sasl_username, kafka.sasl_password). For OAuth/OIDC, use "
    "kafka.transport 'confluent', leave kafka.sasl_mechanism unset and give librdkafka's own "
    "properties in both kafka.consumer_properties and kafka.producer_properties: "
    "sasl.mechanism: OAUTHBEARER, sasl.oauthbearer.method: oidc, sasl.oauthbearer.client.id, "
    "sasl.oauthbearer.client.secret, sasl.oauthbearer.token.endpoint.url (and sasl.oauthbearer.scope "
    "if your provider needs one)"
)


class KafkaSettings(Section):
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

    _split = field_validator("bootstrap_servers", "input_topics", mode="before")(split_list)

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
