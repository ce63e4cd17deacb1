"""From a finished batch to its records handed to the :class:`~.sender.Sender`.

Runs on the serving loop's I/O thread. For each message of a result, in input order: a
message whose partition was revoked or rewound meanwhile is skipped (it will be read
again); one that failed alone is dead-lettered (``inference_failed``); every other one is
decided (:mod:`.decision`), encoded (:class:`~.codec.OutputEncoder`) and sent to the topic
its decided label routes to (``output.routes``, else ``kafka.output_topic``), and then the
publish hook's extra records. Every message of the batch is then sealed: its offset may be
committed once its records are acknowledged.

Invariants:

- **Ordering.** Each batch is produced in input order by one producer with idempotence on,
  and batches arrive in the order they entered the compute thread, so within each output
  topic the outputs of one input partition come out in input order (a rewind re-emits from
  the rewound message onwards). Across output topics there is no order.
- **Every output topic is covered by the delivery guarantee**: all records go through the
  one producer and the :class:`~.sender.Sender`, so an offset is committed only once the
  outputs on every topic are acknowledged, and with exactly-once every topic is produced
  inside the open transaction.
- **The model reference.** Each output names the version of the classifier that computed
  its batch (:attr:`Result.classifier`), and is decided by that classifier's thresholds;
  where the runtime says which of its models decided each row (:attr:`Result.decided_by`,
  the cascade), the output says it too.
- **A failing publish hook** is logged and its records skipped; the outputs stand.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stream_classifier.config import Settings
from stream_classifier.ops.logs import log_event
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.codec import (
    INFERENCE_FAILED,
    Decoded,
    OutgoingRecord,
    OutputEncoder,
    Rejected,
    published_rows,
)
from stream_classifier.stream.compute import Result
from stream_classifier.stream.decision import Decider
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
    labels: Sequence[str]  # the decided label of each message (the abstain label included)
    model_version: str
    abstained: Sequence[bool] = ()  # per message, when decisions are on
    decided_by: Sequence[str] = ()  # per message, which model decided it (model.cascade)


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
        settings: Settings,
        tracker: OffsetTracker,
        sender: Sender,
        metrics: Metrics,
        publish_hook: PublishHook | None,
    ) -> None:
        self._default_topic = settings.kafka.output_topic
        self._routes = dict(settings.output.routes)
        self._decider = Decider(settings.decision)
        self._encoder = OutputEncoder(
            settings.output, decisions=self._decider.active, max_request_size=settings.kafka.max_request_size
        )
        self._tracker = tracker
        self._sender = sender
        self._metrics = metrics
        self._publish_hook = publish_hook

    def check_labels(self, labels: Sequence[str], version: str) -> None:
        """Warn about thresholds and routes naming a label this model does not have (a typo, or a
        label the model lost): they never apply to it."""
        known = {*labels, self._decider.abstain_label}
        unknown = sorted({*self._decider.configured_labels, *self._routes} - known)
        if unknown:
            log_event(
                logger,
                "decision_labels_unknown",
                logging.WARNING,
                labels=unknown,
                model_version=version,
                model_labels=list(labels),
            )

    @property
    def output_topics(self) -> list[str]:
        """Every topic an output can go to."""
        return sorted({self._default_topic, *self._routes.values()})

    def publish(self, result: Result[Item]) -> None:
        classifier = result.classifier
        classes, version = classifier.labels, classifier.version
        thresholds = self._decider.thresholds(classes, classifier.thresholds)
        predicted: Counter[str] = Counter()
        per_topic: Counter[str] = Counter()
        abstained: Counter[str] = Counter()
        confidence = self._metrics.confidence.labels(model_version=version)
        published: list[int] = []
        labels: list[str] = []
        flags: list[bool] = []
        rows, best = published_rows(result.probabilities)
        deciders = result.decided_by
        for index, item in enumerate(result.items):
            if not self._tracker.is_current(item.entry):
                continue  # its partition was revoked or rewound: it will be read again
            failure = result.failed.get(index)
            if failure is None:
                decision = self._decider.decide(classes, rows[index], best[index], thresholds)
                topic = self._routes.get(decision.label, self._default_topic)
                try:
                    out, reduced = self._encoder.encode(
                        item.record,
                        item.decoded,
                        labels=classes,
                        row=rows[index],
                        label=decision.label,
                        top_label=decision.top_label,
                        abstained=decision.abstained,
                        model_version=version,
                        topic=topic,
                        decided_by=None if deciders is None else deciders[index],
                    )
                except ValueError:  # finite probabilities that sum to 0: no distribution to publish
                    failure = "inference failed: the model's probabilities do not sum to a positive number"
            if failure is not None:
                self._sender.dead_letter(item.record, Rejected(INFERENCE_FAILED, failure), item.entry)
                continue
            if reduced is not None:
                self._metrics.outputs_reduced.labels(reason=reduced).inc()
            if not self._sender.send(out, item.entry, item.record, OUTPUT, item.record.timestamp_ms):
                continue
            predicted[decision.label] += 1
            per_topic[topic] += 1
            if decision.abstained:
                abstained[decision.top_label] += 1
            confidence.observe(decision.confidence)
            published.append(index)
            labels.append(decision.label)
            flags.append(decision.abstained)
        if self._publish_hook is not None and published:
            self._run_hook(result, published, labels, flags)
        for item in result.items:
            item.entry.seal()
            self._tracker.settle(item.entry)
        for label, count in predicted.items():
            self._metrics.predictions.labels(label=label, model_version=version).inc(count)
        for topic, count in per_topic.items():
            self._metrics.outputs.labels(topic=topic).inc(count)
        for label, count in abstained.items():
            self._metrics.abstentions.labels(label=label).inc(count)

    def _run_hook(
        self, result: Result[Item], published: list[int], labels: list[str], abstained: list[bool]
    ) -> None:
        assert self._publish_hook is not None
        items = [result.items[i] for i in published]
        batch = PublishedBatch(
            records=[item.record for item in items],
            texts=[item.decoded.text for item in items],
            probabilities=result.probabilities[published],
            classes=result.classifier.labels,
            labels=labels,
            model_version=result.classifier.version,
            abstained=abstained if self._decider.active else (),
            decided_by=[result.decided_by[i] for i in published] if result.decided_by else (),
        )
        try:
            extras = list(self._publish_hook(batch))
        except Exception as exc:
            log_event(logger, "publish_hook_failed", logging.ERROR, error=repr(exc))
            return
        for index, record in extras:
            self._sender.send(record, items[index].entry, items[index].record, OUTPUT)
