"""One exception hierarchy for stream-classifier.

Every error the package raises on purpose derives from :class:`StreamClassifierError`.
Messages say what went wrong *and what to do about it*; the CLI prints them without a
traceback and exits non-zero.
"""

from __future__ import annotations


class StreamClassifierError(Exception):
    """Base class of every error raised on purpose by stream-classifier."""

    exit_code = 1


class ConfigError(StreamClassifierError):
    """A setting is missing or invalid. The message names the setting."""

    exit_code = 2


class ModelError(StreamClassifierError):
    """A model directory cannot be loaded, saved or used."""


class UnsafeModelError(ModelError):
    """Loading would need unrestricted unpickling of an untrusted file."""


class DataError(StreamClassifierError):
    """A training/evaluation data file is unreadable or has bad rows."""


class TrainingError(StreamClassifierError):
    """Training could not produce a model."""


class TransportError(StreamClassifierError):
    """The Kafka client failed in a way the service cannot recover from by retrying."""


class RecordRejectedError(TransportError):
    """The broker refuses one record for good (too large, not authorised, invalid record).

    Retrying cannot help: the service dead-letters the input the record was made for, with
    the reason ``output_rejected``, and goes on.
    """


class UnreadableRecordError(StreamClassifierError):
    """The client cannot parse the record at ``topic``/``partition``/``offset``.

    The service dead-letters its coordinates (nothing else of it can be read) and moves past it.
    """

    def __init__(self, message: str, *, topic: str, partition: int, offset: int) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class ModelStoreError(StreamClassifierError):
    """The model store (versions, manifest) is inconsistent or unreachable."""


class BrokerUnavailableError(StreamClassifierError):
    """A Kafka operation failed for a reason that may pass (broker down, timeout, rebalance).

    The service retries these with backoff and never exits on them.
    """


class DeviceFailedError(StreamClassifierError):
    """The accelerator failed in a way that leaves its context unusable (a device-side assert,
    an illegal memory access): every later call on it would fail the same way.

    Not a message's fault and not retryable in this process: the service stops with a
    non-zero exit, so that the supervisor restarts it with a fresh device context.
    """

    exit_code = 3
