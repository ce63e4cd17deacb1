"""The one settings tree of stream-classifier, one module per part of the data path.

``base`` holds what every section shares; ``kafka``, ``model``, ``serving`` (batching, input,
delivery, decisions, outputs), ``learning`` and ``ops`` hold the sections; ``settings`` the root,
its sources and the environment check; ``secrets`` the masking. Every name is importable from
here. Secrets are :class:`pydantic.SecretStr`: they never appear in ``repr``, logs, ``config``
output or metrics.
"""

from stream_classifier.config.base import ENV_PREFIX, Section, StrList
from stream_classifier.config.kafka import OAUTHBEARER_REFUSED, KafkaSettings
from stream_classifier.config.learning import ActiveLearningSettings, FeedbackSettings, RetrainSettings
from stream_classifier.config.model import ModelSettings
from stream_classifier.config.ops import LoggingSettings, MetricsSettings
from stream_classifier.config.secrets import MASK, is_secret_property, masked_dump
from stream_classifier.config.serving import (
    BatchingSettings,
    DecisionSettings,
    IncludeInput,
    InputSettings,
    OutputSettings,
    ProcessingSettings,
)
from stream_classifier.config.settings import (
    CONFIG_FILE_VARIABLE,
    TEST_VARIABLE_PREFIX,
    Settings,
    check_environment,
    load_settings,
    setting_variables,
)

__all__ = [
    "CONFIG_FILE_VARIABLE",
    "ENV_PREFIX",
    "MASK",
    "OAUTHBEARER_REFUSED",
    "TEST_VARIABLE_PREFIX",
    "ActiveLearningSettings",
    "BatchingSettings",
    "DecisionSettings",
    "FeedbackSettings",
    "IncludeInput",
    "InputSettings",
    "KafkaSettings",
    "LoggingSettings",
    "MetricsSettings",
    "ModelSettings",
    "OutputSettings",
    "ProcessingSettings",
    "RetrainSettings",
    "Section",
    "Settings",
    "StrList",
    "check_environment",
    "is_secret_property",
    "load_settings",
    "masked_dump",
    "setting_variables",
]
