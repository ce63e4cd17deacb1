"""The serving path: micro-batches, input decoding, the delivery guarantee, decisions, outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from stream_classifier.config.base import Section, StrList, split_list


class BatchingSettings(Section):
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


class InputSettings(Section):
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


class ProcessingSettings(Section):
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


class DecisionSettings(Section):
    """How a message's label is decided from its probabilities."""

    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Label -> minimum probability (JSON in the environment, e.g. '{\"spam\": 0.9}'): a message is "
            "published under its top label only when that label's probability reaches its threshold, "
            "otherwise under 'abstain_label'. Overrides the thresholds fitted with the model "
            "('target_precision'). Needs 'abstain_label'."
        ),
    )
    abstain_label: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Label of the messages whose top label misses its threshold (e.g. 'unknown'); their output's "
            "'top_label' keeps the argmax. Unset: every message gets its argmax label."
        ),
    )
    target_precision: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Label -> precision to reach (JSON): training fits each such label's threshold on held-out "
            "predictions, the smallest one that reaches it, and records it with the model."
        ),
    )

    @field_validator("thresholds", "target_precision")
    @classmethod
    def _probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        for label, probability in value.items():
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"'{label}': {probability} is not a probability between 0 and 1")
        return value

    @model_validator(mode="after")
    def _abstain_label_given(self) -> DecisionSettings:
        if (self.thresholds or self.target_precision) and self.abstain_label is None:
            raise ValueError(
                "thresholds need somewhere to send the messages that miss them: set "
                "decision.abstain_label (e.g. 'unknown')"
            )
        return self


IncludeInput = Literal["none", "text", "original"]


class OutputSettings(Section):
    """What an output carries and where it goes."""

    routes: dict[str, str] = Field(
        default_factory=dict,
        description=(
            'Decided label -> output topic (JSON, e.g. \'{"spam": "quarantine", "unknown": "review"}\'); '
            "the abstain label may have one. Labels without a route go to 'kafka.output_topic'."
        ),
    )
    include_input: IncludeInput = Field(
        default="none",
        description=(
            "'none'; 'text' (the classified text under 'text'); 'original' (the input's JSON object whole "
            "under 'input', or its raw text when the input is not JSON)."
        ),
    )
    headers: StrList = Field(
        default_factory=lambda: ["none"],
        description=(
            "Input headers carried onto the output besides the service's own: 'none', 'all', or a list of "
            "header names (a JSON list or comma-separated). W3C 'traceparent' is always carried."
        ),
    )
    timestamp: Literal["input", "produced"] = Field(
        default="produced",
        description="The output record's timestamp: the input record's ('input') or the produce time.",
    )

    _split = field_validator("headers", mode="before")(split_list)

    @field_validator("headers")
    @classmethod
    def _header_mode(cls, value: list[str]) -> list[str]:
        if not value:
            return ["none"]
        if len(value) > 1 and ({"none", "all"} & set(value)):
            raise ValueError("'none' and 'all' stand alone; otherwise give header names")
        return value

    @field_validator("routes")
    @classmethod
    def _topics(cls, value: dict[str, str]) -> dict[str, str]:
        for label, topic in value.items():
            if not topic.strip():
                raise ValueError(f"label '{label}' is routed to an empty topic name")
        return value

    @property
    def header_mode(self) -> Literal["none", "all", "names"]:
        """'none', 'all', or 'names' (then :attr:`headers` lists them)."""
        if self.headers == ["none"]:
            return "none"
        if self.headers == ["all"]:
            return "all"
        return "names"
