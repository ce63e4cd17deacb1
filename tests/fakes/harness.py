"""The real :class:`StreamService` on the fakes: settings for quick tests, a service run on a
thread, bounded waits, and readers for what came out (outputs, dead letters, offsets, metrics)."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from stream_classifier.config import Settings
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.service import PublishHook, StreamService
from stream_classifier.transport import Headers, Partition, Record
from tests.fakes.classifier import StubClassifier
from tests.fakes.transport import FakeTransport

IN, OUT, DLQ = "in", "out", "dlq"


def unit_settings(**sections: dict[str, Any]) -> Settings:
    """Small batches, short waits; ``sections`` are merged into these defaults."""
    values: dict[str, dict[str, Any]] = {
        "kafka": {
            "input_topics": [IN],
            "output_topic": OUT,
            "dead_letter_topic": DLQ,
            "max_poll_records": 50,
        },
        "batching": {"max_batch_size": 8, "max_wait_ms": 5, "max_in_flight": 64},
        "metrics": {"lag_refresh_s": 0.05},
        "processing": {"shutdown_timeout_s": 5.0},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    return Settings(**values)


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def body(record: Record) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(record.value or b"null")
    return value


def header(record: Record, name: str) -> bytes | None:
    return dict(record.headers).get(name)


class ServiceRig:
    """A :class:`StreamService` on a :class:`FakeTransport` and a :class:`StubClassifier`.

    ``with rig:`` runs :meth:`StreamService.run` on a thread; leaving the block releases held
    acks and a held model, stops the service, joins the thread and re-raises what ``run``
    raised. :meth:`wait` fails at once if the service has died.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        partitions: int = 1,
        classifier: StubClassifier | None = None,
        publish_hook: PublishHook | None = None,
    ) -> None:
        self.settings = settings or unit_settings()
        self.transport = FakeTransport(max_request_size=self.settings.kafka.max_request_size)
        self.broker = self.transport.broker
        self.inputs = [
            tp
            for topic in self.settings.kafka.input_topics
            for tp in self.broker.create_topic(topic, partitions)
        ]
        self.classifier = classifier or StubClassifier()
        self.registry = CollectorRegistry()
        self.service = StreamService(
            self.settings,
            self.classifier,  # type: ignore[arg-type]  # the stub has what the loop uses
            metrics=Metrics(registry=self.registry),
            transport=self.transport,
            publish_hook=publish_hook,
        )
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ running

    def __enter__(self) -> ServiceRig:
        self._thread = threading.Thread(target=self._run, name="service-under-test", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if kind is None and self.error is not None:
            raise AssertionError(f"the service failed: {self.error!r}") from self.error

    def stop(self) -> None:
        """Release what the test held back, stop the service and join its thread."""
        self.classifier.release()
        self.transport.release_acks()
        self.service.stop()
        if self._thread is not None:
            self._thread.join(timeout=20)
            assert not self._thread.is_alive(), "the service did not stop"

    def _run(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:
            self.error = exc

    def wait(
        self, predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "the condition"
    ) -> None:
        def done() -> object:
            if self.error is not None:
                raise AssertionError(f"the service failed: {self.error!r}") from self.error
            return predicate()

        wait_until(done, timeout_s, what)

    # ------------------------------------------------------------------ input

    def send(
        self, text: str, *, partition: int = 0, key: bytes | None = None, headers: Headers = (), **fields: Any
    ) -> Record:
        """Write a JSON input ``{"text": text, **fields}`` to the input topic."""
        value = json.dumps({"text": text, **fields}).encode()
        return self.send_raw(value, partition=partition, key=key, headers=headers)

    def send_raw(
        self, value: bytes | None, *, partition: int = 0, key: bytes | None = None, headers: Headers = ()
    ) -> Record:
        topic = self.settings.kafka.input_topics[0]
        return self.broker.produce(topic, value, key=key, headers=headers, partition=partition)

    def send_many(self, count: int, *, partitions: int = 1, text: str = "message {i}") -> list[Record]:
        return [self.send(text.format(i=i), partition=i % partitions) for i in range(count)]

    # ------------------------------------------------------------------ output

    def outputs(self, *, read_committed: bool = True) -> list[Record]:
        return self.broker.records(self.settings.kafka.output_topic, read_committed=read_committed)

    def dead_letters(self, *, read_committed: bool = True) -> list[Record]:
        return self.broker.records(self.settings.kafka.dead_letter_topic, read_committed=read_committed)

    def sources(self, records: list[Record] | None = None) -> dict[int, list[int]]:
        """Input offsets of the outputs, per input partition, in output order."""
        found: dict[int, list[int]] = defaultdict(list)
        for record in self.outputs() if records is None else records:
            source = body(record)["source"]
            found[source["partition"]].append(source["offset"])
        return dict(found)

    def dead_letter_sources(self) -> list[tuple[int, int, str]]:
        """(partition, offset, reason) of each dead letter, in order."""
        return [
            (
                int(header(r, "source.partition") or -1),
                int(header(r, "source.offset") or -1),
                (header(r, "error") or b"").decode(),
            )
            for r in self.dead_letters()
        ]

    def committed_to_end(self) -> bool:
        committed = self.broker.committed()
        ends = {
            tp: end
            for topic in self.settings.kafka.input_topics
            for tp, end in self.broker.end_offsets(topic).items()
        }
        return all(committed.get(tp, 0) == end for tp, end in ends.items())

    def committed(self, partition: int = 0) -> int:
        return self.broker.committed().get(Partition(self.settings.kafka.input_topics[0], partition), 0)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(f"stream_classifier_{name}", labels)
        assert value is not None, f"no sample stream_classifier_{name}{labels}"
        return value
