"""Client configuration: the service's settings in each client's property names.

Secrets (the SASL password, key passwords, pass-through secret properties) reach the client
and nothing else: :func:`describe_client_config` is the only loggable view.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from stream_classifier.config import MASK, KafkaSettings, is_secret_property
from stream_classifier.errors import ConfigError

# Settings the service relies on; pass-through properties may not change them.
_RESERVED_KAFKA_PYTHON_CONSUMER = {"enable_auto_commit": False}
# kafka-python bootstraps while a client is made; its 30 s default makes every failure to
# connect (a wrong password included: see kafka_python_auth.py) a 30 s stall at start.
KAFKA_PYTHON_BOOTSTRAP_TIMEOUT_MS = 10_000


def kafka_python_common_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings shared by consumer and producer (holds the secret)."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": list(k.bootstrap_servers),
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
    }
    cfg.update(
        security_config(
            k,
            sasl_mechanism="sasl_mechanism",
            sasl_username="sasl_plain_username",
            sasl_password="sasl_plain_password",
            ssl_cafile="ssl_cafile",
            ssl_certfile="ssl_certfile",
            ssl_keyfile="ssl_keyfile",
        )
    )
    return cfg


_TLS_FILES = {
    "ssl_cafile": "the CA certificate(s) that signed the brokers' certificates (PEM)",
    "ssl_certfile": "the client certificate (PEM)",
    "ssl_keyfile": "the client certificate's private key (PEM)",
}


def require_tls_files(k: KafkaSettings) -> None:
    """Raise :class:`ConfigError` naming the setting and the file when a TLS file that is set
    cannot be read. Both clients would otherwise retry the connection for ever (kafka-python
    fails each handshake as a connection error), which no retry can cure."""
    if k.security_protocol not in ("SSL", "SASL_SSL"):
        return
    for setting, what in _TLS_FILES.items():
        path: Path | None = getattr(k, setting)
        if path is None:
            continue
        if not path.is_file():
            problem = "does not exist" if not path.exists() else "is not a file"
        elif not os.access(path, os.R_OK):
            problem = "cannot be read by this process"
        else:
            continue
        raise ConfigError(
            f"setting 'kafka.{setting}' names {str(path)!r}, which {problem}: give the path of {what}"
        )


def security_config(k: KafkaSettings, **client_names: str) -> dict[str, Any]:
    """The SASL/SSL settings that are set, each under its client's name (holds the secret).

    ``client_names`` maps a :class:`KafkaSettings` field to the client's property name;
    secrets are revealed and paths become strings.
    """
    cfg: dict[str, Any] = {}
    for setting, name in client_names.items():
        value = getattr(k, setting)
        if isinstance(value, SecretStr):
            cfg[name] = value.get_secret_value()
        elif isinstance(value, Path):
            cfg[name] = str(value)
        elif value is not None:
            cfg[name] = value
    return cfg


def _kafka_python_client_config(k: KafkaSettings) -> dict[str, Any]:
    """The common settings plus the transport's bootstrap bound (consumers and producers)."""
    return {**kafka_python_common_config(k), "bootstrap_timeout_ms": KAFKA_PYTHON_BOOTSTRAP_TIMEOUT_MS}


def kafka_python_consumer_config(k: KafkaSettings, *, read_committed: bool = False) -> dict[str, Any]:
    cfg = _kafka_python_client_config(k)
    cfg.update(
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        group_id=k.group_id,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_records=k.max_poll_records,
        max_partition_fetch_bytes=max(k.max_request_size, 1_048_576),
    )
    return with_consumer_properties(cfg, k.consumer_properties, _RESERVED_KAFKA_PYTHON_CONSUMER)


def kafka_python_reader_config(k: KafkaSettings) -> dict[str, Any]:
    """A whole-topic reader's consumer (:mod:`.reader`): no group, no commits, the
    pass-through consumer properties."""
    cfg = _kafka_python_client_config(k)
    cfg.update(group_id=None, max_partition_fetch_bytes=max(k.max_request_size, 1_048_576))
    cfg = with_consumer_properties(cfg, k.consumer_properties, _RESERVED_KAFKA_PYTHON_CONSUMER)
    cfg["group_id"] = None  # a reader never joins a group, whatever the properties say
    return cfg


def with_consumer_properties(
    cfg: dict[str, Any], properties: Mapping[str, Any], reserved: Mapping[str, Any]
) -> dict[str, Any]:
    """``cfg`` with the pass-through ``properties`` applied; the ``reserved`` settings stay as given.

    Raises :class:`ConfigError` if ``properties`` tries to change a reserved setting.
    """
    cfg.update(properties)
    for name, required in reserved.items():
        if cfg.get(name, required) != required:
            raise ConfigError(
                f"setting 'kafka.consumer_properties.{name}' must not be set: the service commits "
                "offsets itself, after the outputs are acknowledged"
            )
    cfg.update(reserved)
    return cfg


def kafka_python_producer_config(k: KafkaSettings, *, transactional_id: str | None = None) -> dict[str, Any]:
    cfg = _kafka_python_client_config(k)
    # acks=all + idempotence keep per-partition order across retries; a bounded block time
    # turns a missing broker into a retried error instead of a minute-long stall; a 5 ms
    # linger (librdkafka's default) sends a batch's outputs in a few requests instead of one
    # each, which on a small CPU leaves more of it to the model (see docs/performance.md).
    cfg.update(
        acks="all",
        enable_idempotence=True,
        max_request_size=k.max_request_size,
        max_block_ms=10_000,
        linger_ms=5,
    )
    cfg.update(k.producer_properties)
    if transactional_id is not None:
        cfg["transactional_id"] = transactional_id
    return cfg


_RESERVED_CONFLUENT_CONSUMER = {"enable.auto.commit": False}


def confluent_common_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings in librdkafka's names (holds the secret)."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": ",".join(k.bootstrap_servers),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol.lower(),
    }
    cfg.update(
        security_config(
            k,
            sasl_mechanism="sasl.mechanism",
            sasl_username="sasl.username",
            sasl_password="sasl.password",
            ssl_cafile="ssl.ca.location",
            ssl_certfile="ssl.certificate.location",
            ssl_keyfile="ssl.key.location",
        )
    )
    return cfg


def confluent_consumer_config(k: KafkaSettings, *, read_committed: bool = False) -> dict[str, Any]:
    cfg = confluent_common_config(k)
    cfg.update(
        {
            "group.id": k.group_id,
            "auto.offset.reset": k.auto_offset_reset,
            "session.timeout.ms": k.session_timeout_ms,
            "heartbeat.interval.ms": k.heartbeat_interval_ms,
            "max.partition.fetch.bytes": max(k.max_request_size, 1_048_576),
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
    )
    return with_consumer_properties(cfg, k.consumer_properties, _RESERVED_CONFLUENT_CONSUMER)


def confluent_reader_config(k: KafkaSettings) -> dict[str, Any]:
    """A whole-topic reader's consumer (:mod:`.reader`) in librdkafka's names.

    librdkafka wants a ``group.id`` even for a consumer that only assigns; the reader never
    subscribes and never commits, so the group is never joined.
    """
    cfg = confluent_common_config(k)
    cfg.update(
        {
            "group.id": f"{k.group_id}-reader",
            "enable.auto.offset.store": False,
            "max.partition.fetch.bytes": max(k.max_request_size, 1_048_576),
        }
    )
    return with_consumer_properties(cfg, k.consumer_properties, _RESERVED_CONFLUENT_CONSUMER)


def confluent_producer_config(k: KafkaSettings, *, transactional_id: str | None = None) -> dict[str, Any]:
    cfg = confluent_common_config(k)
    # acks=all + idempotence keep per-partition order across retries.
    cfg.update({"acks": "all", "enable.idempotence": True, "message.max.bytes": k.max_request_size})
    cfg.update(k.producer_properties)
    if transactional_id is not None:
        cfg["transactional.id"] = transactional_id
    return cfg


def describe_client_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with secrets masked: the only form a client configuration may be logged in."""
    return {key: (MASK if is_secret_property(key) else value) for key, value in cfg.items()}
