"""Crashes: SIGKILL `serve` at random points while input keeps arriving, restart, repeat.

Nothing may be lost, and the outputs written twice stay within the bound docs/reliability.md
states (the duplicate bound): at most ``batching.max_in_flight`` messages per crash (they were
published, and their offsets not yet committed). Replica loss: two instances, one killed
mid-stream, the other takes its partitions over with no loss.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.faults.support import (
    CI,
    SCALES,
    PacedFeeder,
    Scale,
    model_for,
    output_ids,
    seeded_rng,
)
from tests.fixtures.broker import committed_offsets
from tests.fixtures.kafka_broker import BrokerTarget
from tests.integration.service_support import (
    TopicReader,
    crash,
    serve_topics,
    serving,
    start_serve,
    terminate,
    wait_until,
    write_serve_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MAX_IN_FLIGHT = 256


@pytest.mark.parametrize("scale", SCALES)
def test_repeated_sigkill_loses_nothing_and_duplicates_stay_bounded(
    any_broker: BrokerTarget, tmp_path: Path, request: pytest.FixtureRequest, scale: Scale
) -> None:
    """On both brokers (kafka-python: no Tansu work-around is in this test's config)."""
    if scale is CI:
        any_broker.only_on_apache_kafka_where_it_runs("the crash suites at CI scale (both in soak mode)")
    broker, topic_factory = any_broker.bootstrap, any_broker.topic
    rng = seeded_rng(request)
    model = model_for(scale, request)
    topics = serve_topics(topic_factory, partitions=3)
    source, group = topics.source, f"crash-{topics.source}"
    config = write_serve_config(
        tmp_path / "serve.yaml",
        broker=broker,
        group=group,
        topics=topics,
        model=model,
        batching={"max_in_flight": MAX_IN_FLIGHT},
    )
    n = scale.messages
    # Input arrives over roughly the time the kills take, so every kill lands mid-stream.
    feeder = PacedFeeder(broker, source, n, seconds=12.0 * scale.kills).start()
    reader = TopicReader(broker, topics.out)
    try:
        for kill in range(scale.kills):
            with serving(config, tmp_path / f"serve-{kill}.log") as process:
                before = len(reader.read())
                reader.wait_for(
                    lambda records, b=before: len(records) > b, 180, f"progress after start {kill}"
                )
                time.sleep(rng.uniform(0.0, 2.0))
                crash(process)
        feeder.join(timeout_s=120)
        assert len(set(output_ids(reader.read(1.0)))) < n, "the kills came too late to test anything"

        final_log = tmp_path / "serve-final.log"
        with serving(config, final_log) as final:
            expected = {f"m{i}" for i in range(n)}
            reader.wait_for(lambda records: set(output_ids(records)) == expected, 300, "every message")
            # The outputs may all exist before this instance has even started: stop it only
            # once it is running, so that the SIGTERM tests the graceful path.
            wait_until(lambda: "partitions_assigned" in final_log.read_text(), 120, "the final instance")
            assert terminate(final) == 0
        counts = output_ids(reader.read(1.0))
    finally:
        reader.close()

    assert set(counts) == expected  # nothing lost (and nothing invented)
    duplicates = sum(counts.values()) - len(counts)
    request.node.user_properties.append(("duplicates", duplicates))
    sys.stderr.write(f"crash run: {n} messages, {scale.kills} kills, {duplicates} outputs repeated\n")
    assert duplicates <= scale.kills * MAX_IN_FLIGHT
    assert sum(offset or 0 for offset in committed_offsets(broker, group, source).values()) == n


@pytest.mark.parametrize("scale", SCALES)
def test_replica_loss_the_survivor_takes_over(
    any_broker: BrokerTarget, tmp_path: Path, request: pytest.FixtureRequest, scale: Scale
) -> None:
    """On both brokers: one of two `serve` replicas in a group is SIGKILLed."""
    if scale is CI:
        any_broker.only_on_apache_kafka_where_it_runs("the crash suites at CI scale (both in soak mode)")
    model = model_for(scale, request)
    broker = any_broker.bootstrap
    topics = serve_topics(any_broker.topic, partitions=4)
    config = write_serve_config(
        tmp_path / "serve.yaml",
        broker=broker,
        group=f"replicas-{topics.source}",
        topics=topics,
        model=model,
        transport="confluent",  # the crash test above uses kafka-python
        # Tansu's librdkafka work-around (one record per batch) is for Tansu only.
        **({} if any_broker.is_tansu else {"kafka": {"producer_properties": {}}}),
    )
    n = scale.messages // 2
    feeder = PacedFeeder(broker, topics.source, n, seconds=20.0).start()
    reader = TopicReader(broker, topics.out)
    survivor = start_serve(config, tmp_path / "survivor.log")
    victim = start_serve(config, tmp_path / "victim.log")
    try:
        reader.wait_for(lambda records: len(records) >= n // 5, 180, "both replicas at work")
        crash(victim)
        assert len(set(output_ids(reader.read()))) < n, "the kill came too late to test anything"
        feeder.join(timeout_s=120)
        expected = {f"m{i}" for i in range(n)}
        reader.wait_for(lambda records: set(output_ids(records)) == expected, 240, "every message")
        assert survivor.poll() is None, "the survivor exited"
        assert terminate(survivor) == 0
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()
        reader.close()
