"""From a finished batch to its records handed to the :class:`~.sender.Sender`.

Runs on the serving loop's I/O thread. For each message of a result, in input order: a
message whose partition was revoked or rewound meanwhile is skipped (it will be read
again); one that failed alone is dead-lettered (``inference_failed``); every other one gets
its output, and then the publish hook's extra records. Every message of the batch is then
sealed: its offset may be committed once its records are acknowledged.

Invariants:

- **Ordering.** Each batch is produced in input order by one producer with idempotence on,
  and batches arrive in the order they entered the compute thread, so outputs of one input
  partition come out in input order (a rewind re-emits from the rewound message onwards).
- **The model reference.** Each output names the version of the classifier that computed
  its batch (:attr:`Result.classifier`).
- **A failing publish hook** is logged and its records skipped; the outputs stand.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stream_classifier.config import KafkaSettings
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.codec import (
    INFERENCE_FAILED,
    Decoded,
    OutgoingRecord,
    Rejected,
    encode_prediction,
    published_rows,
)
from stream_classifier.stream.compute import Result
from stream_classifier.stream.offsets import OffsetTracker, Pending
from stream_classifier.stream.sender import OUTPUT, Sender
from stream_classifier.transport.base import Record

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublishedBatch:
    """What the publish hook sees: the classified messages of one batch, in input order."""

    records: Sequence[Record]
    texts: Sequence[str]
    probabilities: np.ndarray  # (n, k), rows in ``classes`` order
    classes: Sequence[str]
    labels: Sequence[str]  # the predicted label of each message
    model_version: str


# Returns extra records to produce, each with the index (in the batch) of the message it
# belongs to; that message is committed only once its extra records are acknowledged too.
PublishHook = Callable[[PublishedBatch], Iterable[tuple[int, OutgoingRecord]]]


@dataclass(slots=True)
class Item:
    """One decoded message on its way through the batcher and the model."""

    record: Record
    decoded: Decoded
    entry: Pending


class Publisher:
    """Turns a finished batch into outputs, dead letters and the hook's records."""

    def __init__(
        self,
        kafka: KafkaSettings,
        tracker: OffsetTracker,
        sender: Sender,
        metrics: Metrics,
        publish_hook: PublishHook | None,
    ) -> None:
        self._kafka = kafka
        self._tracker = tracker
        self._sender = sender
        self._metrics = metrics
        self._publish_hook = publish_hook

    def publish(self, result: Result[Item]) -> None:
        classes = result.classifier.labels
        version = result.classifier.version
        topic = self._kafka.output_topic
        predicted: Counter[str] = Counter()
        published: list[int] = []
        labels: list[str] = []
        rows, best = published_rows(result.probabilities)
        for index, item in enumerate(result.items):
            if not self._tracker.is_current(item.entry):
                continue  # its partition was revoked or rewound: it will be read again
            failure = result.failed.get(index)
            if failure is not None:
                self._sender.dead_letter(item.record, Rejected(INFERENCE_FAILED, failure), item.entry)
                continue
            out, label, confidence = encode_prediction(
                item.record,
                id_=item.decoded.id,
                labels=classes,
                row=rows[index],
                best=best[index],
                model_version=version,
                topic=topic,
            )
            if not self._sender.send(out, item.entry, item.record, OUTPUT, item.record.timestamp_ms):
                continue
            predicted[label] += 1
            self._metrics.confidence.observe(confidence)
            published.append(index)
            labels.append(label)
        if self._publish_hook is not None and published:
            self._run_hook(result, published, labels)
        for item in result.items:
            item.entry.seal()
            self._tracker.settle(item.entry)
        for label, count in predicted.items():
            self._metrics.predictions.labels(label=label).inc(count)

    def _run_hook(self, result: Result[Item], published: list[int], labels: list[str]) -> None:
        assert self._publish_hook is not None
        items = [result.items[i] for i in published]
        batch = PublishedBatch(
            records=[item.record for item in items],
            texts=[item.decoded.text for item in items],
            probabilities=result.probabilities[published],
            classes=result.classifier.labels,
            labels=labels,
            model_version=result.classifier.version,
        )
        try:
            extras = list(self._publish_hook(batch))
        except Exception as exc:
            log_event(logger, "publish_hook_failed", logging.ERROR, error=repr(exc))
            return
        for index, record in extras:
            self._sender.send(record, items[index].entry, items[index].record, OUTPUT)
