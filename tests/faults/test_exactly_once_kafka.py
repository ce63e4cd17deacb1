"""Exactly-once defects, each proven on Apache Kafka (Tansu serves aborted records to
``read_committed`` readers, so none of this can be seen there).

- A rebalance in the middle of a transaction: the revoked partitions' outputs never commit
  without their offsets, so their next owner's outputs are the only ones a
  ``read_committed`` reader sees (both clients: kafka-python revokes after the partitions
  went, librdkafka before).
- Shutdown in exactly-once mode honours ``processing.shutdown_timeout_s`` with the broker
  stopped (SIGSTOP) and a transaction open.
- A stable transactional id: a SIGKILLed instance's open transaction is fenced when the
  instance restarts, so ``read_committed`` readers see the restarted instance's outputs long
  before the transaction timeout (with a random id per process they waited for it).
- After an aborted transaction (here the broker fenced it) no partition keeps a commit
  point reached inside it, so the next transaction cannot commit the offset of outputs that
  were aborted.

Each of these failed on the service before its fix (docs/reliability.md records how).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from stream_classifier.app import App
from stream_classifier.model.runtime import ModelRuntime
from stream_classifier.ops.metrics import Metrics
from stream_classifier.transport import make_transport
from stream_classifier.transport.base import Consumer, Partition, Producer, Record, Transport
from tests.faults.support import PacedFeeder, message, output_ids
from tests.fixtures.broker import TRANSPORTS, committed_offsets, produce
from tests.fixtures.kafka_broker import ApacheKafka, create_kafka_topics, kafka_settings_factory
from tests.integration.service_support import (
    TopicReader,
    crash,
    running_service,
    serve_topics,
    service_settings,
    serving,
    terminate,
    wait_until,
    write_serve_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

# Closing the clients after the deadline may take a few seconds more with the broker stopped
# (each close is bounded by the client); the transaction's own timeouts are 30 s each.
_SHUTDOWN_SLACK_S = 12.0
# A crashed transaction left open blocks read_committed readers until this timeout ...
_TRANSACTION_TIMEOUT_MS = 120_000
# ... while a restart that fences it lets them see every output well within this.
_FENCED_WITHIN_S = 60


class CommittedReader:
    """A ``read_committed`` reader of a whole topic (no group), accumulating across calls."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        partitions = self._consumer.partitions_for_topic(topic) or set()
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self.records: list[Any] = []

    def read(self, timeout_s: float = 0.2) -> list[Any]:
        for batch in self._consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            self.records.extend(batch)
        return self.records

    def settled(self, quiet_s: float = 2.0, timeout_s: float = 60.0) -> list[Any]:
        """Everything visible once nothing new came for ``quiet_s``."""
        deadline, last = time.monotonic() + timeout_s, len(self.read())
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
            if len(self.read()) != last:
                last, quiet_since = len(self.records), time.monotonic()
        return self.records

    def close(self) -> None:
        self._consumer.close()


def _eos(kafka: Any, instance: str, **processing: Any) -> Any:
    return service_settings(
        kafka,
        batching={"max_batch_size": 4, "max_wait_ms": 10},
        processing={
            "guarantee": "exactly_once",
            # Only the revoke, or the shutdown, commits in these tests.
            "commit_interval_ms": 600_000,
            "transactional_id": f"{instance}-{uuid.uuid4().hex[:8]}",
            "shutdown_timeout_s": 20.0,
            **processing,
        },
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_rebalance_mid_transaction_commits_no_output_without_its_offset(
    kafka_cluster: ApacheKafka,
    kafka_topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    transport: str,
) -> None:
    """Instance A holds an open transaction with outputs of both partitions when B joins and
    takes one. Before the fix A kept those outputs in its transaction and committed them at
    its shutdown without the partition's offset, while B published them again: duplicates."""
    broker = kafka_cluster.plaintext
    source, out, dlq = (
        kafka_topic_factory("in", partitions=2),
        kafka_topic_factory("out"),
        kafka_topic_factory("dlq"),
    )
    kafka = kafka_settings_factory(kafka_cluster, transport)(
        input_topics=[source], output_topic=out, dead_letter_topic=dlq
    )
    runtimes = [ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32") for _ in range(2)]
    for partition in (0, 1):
        produce(broker, source, [(None, message(i)) for i in range(partition, 20, 2)], partition=partition)
    uncommitted = TopicReader(broker, out)
    committed = CommittedReader(broker, out)
    try:
        with running_service(_eos(kafka, "a"), runtimes[0]) as first:
            uncommitted.wait_for(lambda rs: len(rs) >= 20, 60, "20 outputs in A's open transaction")
            assert committed.read(0.5) == []  # nothing committed yet: the transaction is open
            with running_service(_eos(kafka, "b"), runtimes[1]) as second:
                wait_until(lambda: len(second.assignment) == 1, 60, "B to take a partition")
                wait_until(lambda: len(first.assignment) == 1, 60, "A to give it up")
                for partition in (0, 1):
                    produce(broker, source, [(None, message(20 + partition))], partition=partition)
                uncommitted.wait_for(
                    lambda rs: {"m20", "m21"} <= set(output_ids(rs)), 60, "the later outputs"
                )
            # B left (committing its transaction); A takes its partition back, then stops.
            wait_until(lambda: len(first.assignment) == 2, 60, "A to take everything back")
        counts = output_ids(committed.settled())
    finally:
        uncommitted.close()
        committed.close()
    assert counts == Counter({f"m{i}": 1 for i in range(22)})
    assert sum(c or 0 for c in committed_offsets(broker, kafka.group_id, source).values()) == 22


def test_exactly_once_shutdown_honours_its_timeout_with_the_broker_stopped(
    kafka_broker_factory: Callable[..., ApacheKafka], tiny_model_dir: Path
) -> None:
    """The broker is stopped (SIGSTOP) while a transaction is open; stopping the service must
    take about ``shutdown_timeout_s``, not the transaction's own 30 s timeouts. Before the fix
    the commit waited 30 s for the offsets and 30 s more for the commit.

    kafka-python only: librdkafka's ``send_offsets_to_transaction`` ignores its timeout when
    the coordinator does not answer and returns after ``socket.timeout.ms`` (60 s by default;
    docs/reliability.md#brokers-and-clients).
    """
    transport = "kafka-python"
    cluster = kafka_broker_factory()
    admin = KafkaAdminClient(bootstrap_servers=cluster.plaintext)
    try:
        create_kafka_topics(admin, ["in"], partitions=2)
        create_kafka_topics(admin, ["out", "dlq"])
    finally:
        admin.close()
    kafka = kafka_settings_factory(cluster, transport)(
        input_topics=["in"], output_topic="out", dead_letter_topic="dlq"
    )
    shutdown_timeout_s = 3.0
    settings = _eos(kafka, "shutdown", shutdown_timeout_s=shutdown_timeout_s)
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    produce(cluster.plaintext, "in", [(None, message(i)) for i in range(10)])
    reader = TopicReader(cluster.plaintext, "out")
    app = App(settings, runtime=runtime, metrics=Metrics(CollectorRegistry()), ops=False, learning=False)
    paused = False
    try:
        with app.running(join_timeout_s=shutdown_timeout_s + _SHUTDOWN_SLACK_S):
            app.wait_started(timeout_s=60)
            reader.wait_for(lambda rs: len(rs) >= 10, 60, "10 outputs in the open transaction")
            os.kill(cluster.pid, signal.SIGSTOP)
            paused = True
            began = time.monotonic()
        took = time.monotonic() - began
    finally:
        if paused:
            os.kill(cluster.pid, signal.SIGCONT)
        reader.close()
    print(f"eos-shutdown: transport={transport} shutdown_timeout_s={shutdown_timeout_s} took={took:.1f}s")


def test_a_restarted_instance_fences_its_crashed_transaction_at_once(
    kafka_cluster: ApacheKafka, kafka_topic_factory: Callable[..., str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL `serve` with a transaction open, restart it: its stable transactional id fences
    the crashed transaction at once, so a ``read_committed`` reader sees every output long
    before the transaction timeout (120 s here). With a random id per process the crashed
    transaction stayed open until that timeout and held every reader back."""
    broker = kafka_cluster.plaintext
    topics = serve_topics(kafka_topic_factory, partitions=2)
    config = write_serve_config(
        tmp_path / "serve.yaml",
        broker=broker,
        group=f"fence-{topics.source}",
        topics=topics,
        model=tiny_model_dir,
        processing={"guarantee": "exactly_once", "commit_interval_ms": 2_000},
        kafka={"producer_properties": {"transaction_timeout_ms": _TRANSACTION_TIMEOUT_MS}},
    )
    n = 200
    feeder = PacedFeeder(broker, topics.source, n, seconds=8.0).start()
    uncommitted = TopicReader(broker, topics.out)
    committed = CommittedReader(broker, topics.out)
    try:
        with serving(config, tmp_path / "serve-0.log") as process:
            uncommitted.wait_for(lambda rs: len(rs) >= 40, 120, "outputs before the kill")
            crash(process)  # commits every 2 s while fed: a transaction is open
        feeder.join(timeout_s=60)
        with serving(config, tmp_path / "serve-1.log") as restarted:
            wait_until(
                lambda: len(set(output_ids(committed.read()))) == n,
                _FENCED_WITHIN_S,
                f"every output visible to read_committed within {_FENCED_WITHIN_S} s of the restart",
            )
            assert terminate(restarted) == 0
        counts = output_ids(committed.settled())
    finally:
        uncommitted.close()
        committed.close()
    assert counts == Counter({f"m{i}": 1 for i in range(n)})


class _WithholdingConsumer:
    """A real consumer whose polls leave out ``withheld``'s records: a fetch of that partition
    that has not come back yet (the consumer's position still moves past them)."""

    def __init__(self, consumer: Consumer, withheld: Partition) -> None:
        self._consumer = consumer
        self._withheld = withheld

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        return [r for r in self._consumer.poll(timeout_s, max_records) if r.tp != self._withheld]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _FetchDelayedAfterReconnect:
    """The real transport, except that every consumer after the first (the service's clients
    after a reconnect) withholds one partition's records."""

    def __init__(self, transport: Transport, withheld: Partition) -> None:
        self._transport = transport
        self._withheld = withheld
        self.consumers = 0

    def consumer(self, *, read_committed: bool = False) -> Consumer:
        consumer = self._transport.consumer(read_committed=read_committed)
        self.consumers += 1
        if self.consumers == 1:
            return consumer
        return _WithholdingConsumer(consumer, self._withheld)

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        return self._transport.producer(transactional_id=transactional_id)


def test_an_aborted_transaction_leaves_no_commit_point_behind_on_apache_kafka(
    kafka_cluster: ApacheKafka, kafka_topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    """Partition 0's ten outputs are in a transaction that the broker aborts (a producer with
    the same transactional id fences it), so the commit fails and the service reconnects.
    Partition 0 has nothing pending then. Its records do not come back before the next
    transaction (one output of partition 1) commits at shutdown. Before the fix partition 0
    kept the commit point 10 reached inside the aborted transaction, and that transaction
    committed it: the next owner started at 10 and ten outputs were lost.

    The fence is what a restarted instance with the same transactional id does to a zombie.
    kafka-python only: a fenced librdkafka producer is fatal (the service stops with an
    error and its restart reads from the committed offsets), so no commit point survives."""
    broker = kafka_cluster.plaintext
    source, out, dlq = (
        kafka_topic_factory("in", partitions=2),
        kafka_topic_factory("out"),
        kafka_topic_factory("dlq"),
    )
    kafka = kafka_settings_factory(kafka_cluster, "kafka-python")(
        input_topics=[source], output_topic=out, dead_letter_topic=dlq
    )
    # The first commit, 8 s after the start, finds the transaction fenced.
    settings = _eos(kafka, "abort", commit_interval_ms=8_000)
    transactional_id = settings.processing.transactional_id
    assert transactional_id is not None
    transport = _FetchDelayedAfterReconnect(make_transport(kafka), withheld=Partition(source, 0))
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
    produce(broker, source, [(None, message(i)) for i in range(10)], partition=0)
    uncommitted = TopicReader(broker, out)
    committed = CommittedReader(broker, out)
    try:
        with running_service(settings, runtime, transport=transport) as service:
            uncommitted.wait_for(lambda rs: len(rs) >= 10, 60, "10 outputs in the open transaction")
            fencer = KafkaProducer(bootstrap_servers=broker, transactional_id=transactional_id)
            fencer.init_transactions()  # aborts the open transaction
            fencer.close()
            wait_until(
                lambda: transport.consumers == 2 and len(service.assignment) == 2,
                60,
                "the failed commit to reconnect the clients",
            )
            produce(broker, source, [(None, message(10))], partition=1)
            uncommitted.wait_for(lambda rs: "m10" in output_ids(rs), 60, "the output of partition 1")
        offsets = committed_offsets(broker, kafka.group_id, source)
        assert offsets.get(0) in (None, 0), f"partition 0 committed at {offsets.get(0)} without its outputs"
        with running_service(
            _eos(kafka, "next"), ModelRuntime.load(tiny_model_dir, device="cpu", precision="fp32")
        ):
            uncommitted.wait_for(
                lambda rs: output_ids(rs)["m0"] >= 2, 60, "partition 0 read again by its next owner"
            )
        counts = output_ids(committed.settled())
    finally:
        uncommitted.close()
        committed.close()
    assert counts == Counter({f"m{i}": 1 for i in range(11)})
