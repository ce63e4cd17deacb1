"""Whole-topic reads for the learning side: the feedback, trusted-eval and model-updates topics.

A :class:`TopicReader` assigns itself every partition of its topics (manual assignment: no
group, no committed offsets, no rebalances) and starts from the beginning or the end of
each. The learning side reads topics this way because its state is rebuilt from the topics
themselves at every start: committed offsets would make a restarted trainer skip the
history it needs.

:func:`make_reader` builds one with what serving uses: the client named by
``kafka.transport``, the security settings and the pass-through
``kafka.consumer_properties`` (:mod:`.client_config`; the reader never joins a group and
never commits), and the same error classification:

- :class:`~stream_classifier.errors.BrokerUnavailableError` for what may pass (the broker
  is down, a request timed out): the caller retries;
- :class:`~stream_classifier.errors.TransportError` for what will not: credentials the
  broker refuses, a topic the ACLs deny, a topic still missing after
  ``wait_for_topics_s``. The message names the cause and the topics.

Partitions added to a topic after the reader started are not followed (restart to pick
them up). This module imports no client; each implementation lives beside its transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from stream_classifier.config import KafkaSettings
from stream_classifier.errors import BrokerUnavailableError, TransportError
from stream_classifier.transport.base import Partition, Record
from stream_classifier.transport.client_config import require_tls_files

Start = Literal["beginning", "end"]
DEFAULT_WAIT_FOR_TOPICS_S = 30.0
_DISCOVERY_RETRY_S = 0.5


def offsets_key(topic: str, partition: int) -> str:
    """How a partition is named in the manifest's offset maps."""
    return f"{topic}:{partition}"


class TopicReader(Protocol):
    """Every partition of :attr:`topics`, read from the start it was opened with."""

    @property
    def topics(self) -> list[str]: ...

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Record]: ...

    def positions(self) -> dict[str, int]:
        """The next offset to read, per partition (:func:`offsets_key` names)."""

    def end_offsets(self) -> dict[str, int]:
        """The partitions' end offsets now (:func:`offsets_key` names)."""

    def read_to_end(self, timeout_s: float) -> list[Record]:
        """Every record up to the end offsets as of now (a whole, finite topic read)."""

    def close(self) -> None:
        """Release the connection; never raises."""


class ReaderBase:
    """What both implementations share: the partitions, :meth:`read_to_end`."""

    _partitions: list[Partition]

    @property
    def topics(self) -> list[str]:
        return sorted({tp.topic for tp in self._partitions})

    def poll(self, timeout_s: float, max_records: int = 500) -> list[Record]:
        raise NotImplementedError

    def positions(self) -> dict[str, int]:
        raise NotImplementedError

    def end_offsets(self) -> dict[str, int]:
        raise NotImplementedError

    def read_to_end(self, timeout_s: float) -> list[Record]:
        targets = self.end_offsets()
        deadline = time.monotonic() + timeout_s
        records: list[Record] = []
        while any(self.positions()[k] < end for k, end in targets.items()):
            if time.monotonic() >= deadline:
                raise BrokerUnavailableError(f"timed out reading topic(s) {self.topics} to their end")
            records.extend(self.poll(0.5))
        return records


def discover(
    topics: Sequence[str],
    partitions_of: Callable[[str], Sequence[int]],
    *,
    wait_s: float,
    where: str,
) -> list[Partition]:
    """Every partition of ``topics``, waiting up to ``wait_s`` for the missing ones.

    ``partitions_of(topic)`` returns the partition ids (empty while the topic does not
    exist) and raises :class:`TransportError` for a topic the broker will not show (ACLs).
    """
    deadline = time.monotonic() + wait_s
    found: list[Partition] = []
    missing = list(dict.fromkeys(topics))
    while True:
        for topic in list(missing):
            ids = partitions_of(topic)
            if ids:
                found.extend(Partition(topic, p) for p in sorted(ids))
                missing.remove(topic)
        if not missing:
            return found
        if time.monotonic() >= deadline:
            raise TransportError(
                f"topic(s) {missing} do not exist on {where} (waited {wait_s:.0f} s): create them "
                "(feedback topics need retention.ms=-1 or cleanup.policy=compact)"
            )
        time.sleep(_DISCOVERY_RETRY_S)


def denied_topics_error(topics: Sequence[str], principal_hint: str, action: str) -> TransportError:
    """The fatal error for topics the broker's ACLs deny to this client."""
    return TransportError(
        f"{action} failed: the broker denies topic(s) {sorted(set(topics))} to this client "
        f"(TOPIC_AUTHORIZATION_FAILED, {principal_hint}): grant it Describe and Read on them "
        "with kafka-acls, or fix the topic names"
    )


def principal_hint(settings: KafkaSettings) -> str:
    """Who the broker sees, as far as the settings tell (for error messages)."""
    if settings.security_protocol.startswith("SASL") and settings.sasl_username:
        return f"SASL user {settings.sasl_username!r}"
    if settings.ssl_certfile is not None:
        return f"the certificate {settings.ssl_certfile}"
    return f"security protocol {settings.security_protocol}"


def make_reader(
    settings: KafkaSettings,
    topics: Sequence[str],
    *,
    start: Start,
    wait_for_topics_s: float = DEFAULT_WAIT_FOR_TOPICS_S,
) -> TopicReader:
    """A reader of ``topics`` from ``start`` with the client named by ``settings.transport``;
    :class:`~stream_classifier.errors.ConfigError` for a TLS file that cannot be read."""
    require_tls_files(settings)
    if settings.transport == "confluent":
        from stream_classifier.transport.confluent_reader import ConfluentReader  # noqa: PLC0415 - [fast]

        return ConfluentReader(settings, topics, start=start, wait_for_topics_s=wait_for_topics_s)
    from stream_classifier.transport.kafka_python_reader import KafkaPythonReader  # noqa: PLC0415

    return KafkaPythonReader(settings, topics, start=start, wait_for_topics_s=wait_for_topics_s)
