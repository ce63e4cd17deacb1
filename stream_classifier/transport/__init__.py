"""Kafka in and out, behind the protocols of :mod:`.base`.

:func:`make_transport` picks the implementation named by ``settings.transport``:
kafka-python (:mod:`.kafka_python`, the default) or confluent-kafka (:mod:`.confluent`, the
``[fast]`` extra, imported only when chosen). :func:`make_reader` does the same for the
learning side's whole-topic readers (:mod:`.reader`). Importing this package imports no
client.
"""

from __future__ import annotations

from stream_classifier.config import KafkaSettings
from stream_classifier.transport.base import (
    Consumer,
    DeliveryCallback,
    Headers,
    Partition,
    Producer,
    RebalanceListener,
    Record,
    Transport,
)
from stream_classifier.transport.client_config import require_tls_files
from stream_classifier.transport.reader import TopicReader, make_reader, offsets_key

__all__ = [
    "Consumer",
    "DeliveryCallback",
    "Headers",
    "Partition",
    "Producer",
    "RebalanceListener",
    "Record",
    "TopicReader",
    "Transport",
    "make_reader",
    "make_transport",
    "offsets_key",
]


def make_transport(settings: KafkaSettings) -> Transport:
    """The transport named by ``settings.transport`` (its client is imported only then).

    Raises :class:`~stream_classifier.errors.ConfigError` for a TLS file that cannot be read.
    """
    require_tls_files(settings)
    if settings.transport == "confluent":
        from stream_classifier.transport.confluent import ConfluentTransport  # noqa: PLC0415 - [fast] extra

        return ConfluentTransport(settings)
    from stream_classifier.transport.kafka_python import KafkaPythonTransport  # noqa: PLC0415

    return KafkaPythonTransport(settings)
