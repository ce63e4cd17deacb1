"""The root of the settings tree, its sources, and the check of the environment.

Sources, highest priority first: keyword arguments, environment variables
(``STREAM_CLASSIFIER_`` prefix, ``__`` between nesting levels, e.g.
``STREAM_CLASSIFIER_KAFKA__BOOTSTRAP_SERVERS``), the YAML file given with ``--config``,
then the defaults. Every value is validated by pydantic; a validation failure is raised as
:class:`~stream_classifier.errors.ConfigError` naming the setting at fault. Every variable
under the prefix must name a setting (or be ``STREAM_CLASSIFIER_CONFIG_FILE``, or belong to
the test suite under ``STREAM_CLASSIFIER_TEST_``): an unknown one is refused, naming the
closest setting, so that a typo never leaves a setting silently at its default.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from stream_classifier.config.base import ENV_PREFIX
from stream_classifier.config.kafka import KafkaSettings
from stream_classifier.config.learning import ActiveLearningSettings, FeedbackSettings, RetrainSettings
from stream_classifier.config.model import ModelSettings
from stream_classifier.config.ops import LoggingSettings, MetricsSettings
from stream_classifier.config.serving import (
    BatchingSettings,
    DecisionSettings,
    InputSettings,
    OutputSettings,
    ProcessingSettings,
)
from stream_classifier.errors import ConfigError

CONFIG_FILE_VARIABLE = ENV_PREFIX + "CONFIG_FILE"
TEST_VARIABLE_PREFIX = ENV_PREFIX + "TEST_"


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
    decision: DecisionSettings = Field(
        default_factory=DecisionSettings,
        description="Thresholds and abstention: how a label is decided from the probabilities.",
    )
    output: OutputSettings = Field(
        default_factory=OutputSettings,
        description="Routes by label, and what an output carries of its input.",
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

    Raises :class:`ConfigError` naming each setting at fault, or the first variable under the
    prefix that names no setting.
    """
    global _config_file  # noqa: PLW0603 - pydantic-settings sources are built per class call
    check_environment(os.environ)
    if config_file is None and os.environ.get(CONFIG_FILE_VARIABLE):
        config_file = os.environ[CONFIG_FILE_VARIABLE]
    _config_file = Path(config_file) if config_file is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    finally:
        _config_file = None


def setting_variables() -> dict[str, str]:
    """Every environment variable that sets something: name -> the setting's dotted path.

    A section takes a whole JSON object (``STREAM_CLASSIFIER_KAFKA``), a field its value, and
    a mapping field its keys one by one (``..._KAFKA__CONSUMER_PROPERTIES__<KEY>``, matched as
    a prefix by :func:`check_environment`).
    """
    names: dict[str, str] = {CONFIG_FILE_VARIABLE: "--config"}
    for section, info in Settings.model_fields.items():
        names[f"{ENV_PREFIX}{section.upper()}"] = section
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for field in model.model_fields:
            names[f"{ENV_PREFIX}{section.upper()}__{field.upper()}"] = f"{section}.{field}"
    return names


def _mapping_fields() -> set[str]:
    found = set()
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for field, field_info in model.model_fields.items():
            if get_origin(field_info.annotation) is dict:
                found.add(f"{ENV_PREFIX}{section.upper()}__{field.upper()}__")
    return found


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse any ``STREAM_CLASSIFIER_*`` variable that names no setting.

    Raises :class:`ConfigError` naming the variable and the closest valid one.
    """
    known = setting_variables()
    mapping_prefixes = _mapping_fields()
    for raw in sorted(environ):
        name = raw.upper()
        if not name.startswith(ENV_PREFIX) or name.startswith(TEST_VARIABLE_PREFIX) or name in known:
            continue
        if any(name.startswith(prefix) and len(name) > len(prefix) for prefix in mapping_prefixes):
            continue
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]} ({known[close[0]]})?" if close else ""
        raise ConfigError(
            f"environment variable {raw} names no setting{hint} Settings are listed in "
            "docs/configuration.md; unset the variable or correct its name."
        )
