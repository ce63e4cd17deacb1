"""The serving loop against records and failures no single one of which may crash, stall or loop it
(issue 12 items 3, 4, 5 and 11), on the in-memory transport and the stub classifier.

"""

from __future__ import annotations

import json

import pytest

from stream_classifier.errors import BrokerUnavailableError, RecordRejectedError
from stream_classifier.transport import Partition, Record
from tests.fakes.classifier import StubClassifier
from tests.fakes.harness import DLQ, IN, OUT, ServiceRig, body, unit_settings
from tests.fakes.transport import Sent

pytestmark = pytest.mark.timeout(60)

P0 = Partition(IN, 0)
MINIMAL_HEADERS = {"error", "error.message", "source.topic", "source.partition", "source.offset"}


def source_offset(sent: Sent) -> tuple[int, int] | None:
    """(partition, offset) of the input an output is for; None for other records."""
    if sent.topic != OUT:
        return None
    source = json.loads(sent.value or b"{}")["source"]
    return source["partition"], source["offset"]


def assert_minimal(letter: Record) -> None:
    """A minimal dead letter: no key, no input headers, at most a small value of its own."""
    assert letter.key is None
    assert {name for name, _ in letter.headers} <= MINIMAL_HEADERS
    assert len(letter.value or b"") < 512


class OutOfMemoryError(RuntimeError):
    """Named like torch's CUDA out-of-memory error."""


@pytest.mark.parametrize("at", ["callback", "send"])
def test_an_output_refused_for_good_dead_letters_its_input_and_the_partition_goes_on(at: str) -> None:
    rig = ServiceRig(partitions=2)
    rig.transport.fail_sends(
        RecordRejectedError, when=lambda s: source_offset(s) == (0, 3), times=None, at=at
    )
    sent = rig.send_many(20, partitions=2)
    with rig:
        rig.wait(
            lambda: rig.committed_to_end() or rig.metric("produce_errors_total") > 3,
            what="everything committed (or a retry loop)",
        )
    assert rig.committed_to_end()
    assert rig.dead_letter_sources() == [(0, 3, "output_rejected")]
    assert rig.dead_letters()[0].value == sent[6].value  # the full dead letter: input 3 of partition 0
    assert rig.sources() == {0: [o for o in range(10) if o != 3], 1: list(range(10))}  # none twice
    assert rig.metric("dead_letters_total", reason="output_rejected") == 1


def test_a_refused_dead_letter_falls_back_to_a_minimal_one() -> None:
    rig = ServiceRig()
    inputs = rig.send_many(8)

    def refused(sent: Sent) -> bool:  # input 3's output, and any dead letter that carries input 3
        return source_offset(sent) == (0, 3) or (sent.topic == DLQ and sent.value == inputs[3].value)

    rig.transport.fail_sends(RecordRejectedError, when=refused, times=None)
    with rig:
        rig.wait(lambda: rig.committed_to_end() or rig.metric("produce_errors_total") > 4)
    assert rig.committed_to_end()
    assert rig.dead_letter_sources() == [(0, 3, "output_rejected")]
    assert_minimal(rig.dead_letters()[0])
    assert rig.sources() == {0: [0, 1, 2, 4, 5, 6, 7]}


def test_a_key_over_max_request_size_dead_letters_its_input_minimally() -> None:
    rig = ServiceRig(unit_settings(kafka={"max_request_size": 1024}))
    with rig:
        rig.send("first")
        rig.send("huge key", key=b"k" * 2000)
        rig.send("last", key=b"small")
        rig.wait(rig.committed_to_end, what="everything committed")
    assert rig.dead_letter_sources() == [(0, 1, "output_too_large")]
    assert_minimal(rig.dead_letters()[0])
    assert rig.sources() == {0: [0, 2]}
    assert [body(r)["id"] for r in rig.outputs()] == [f"{IN}:0:0", f"{IN}:0:2"]


def test_many_partitions_failing_at_once_do_not_stop_the_loop_for_longer_than_liveness() -> None:
    limit_s = 1.0
    settings = unit_settings(batching={"max_batch_size": 64}, metrics={"liveness_timeout_s": limit_s})
    rig = ServiceRig(settings, partitions=4)
    first = lambda s: (source_offset(s) or (0, -1))[1] == 0  # noqa: E731 - each partition's first output
    rig.transport.fail_sends(BrokerUnavailableError, when=first, times=4)
    rig.send_many(16, partitions=4)  # one batch: four failures in one round of acknowledgements
    with rig:
        rig.wait(
            lambda: rig.committed_to_end() or rig.transport.max_poll_gap(until_now=True) > limit_s,
            what="everything committed (or a stalled loop)",
        )
    assert rig.transport.max_poll_gap() < limit_s
    assert rig.committed_to_end()
    assert {p: set(offsets) for p, offsets in rig.sources().items()} == {p: set(range(4)) for p in range(4)}


def test_an_unreadable_record_is_dead_lettered_by_its_coordinates_and_the_partition_goes_on() -> None:
    rig = ServiceRig()
    rig.send_many(10)
    rig.broker.corrupt(IN, 0, 3)
    with rig:
        rig.wait(rig.committed_to_end, what="everything committed")
    assert rig.dead_letter_sources() == [(0, 3, "unreadable_record")]
    assert_minimal(rig.dead_letters()[0])
    assert rig.sources() == {0: [0, 1, 2, 4, 5, 6, 7, 8, 9]}
    assert rig.metric("dead_letters_total", reason="unreadable_record") == 1


@pytest.mark.parametrize("error", [RuntimeError, OutOfMemoryError])
def test_a_broken_runtime_pauses_consumption_turns_not_ready_and_dead_letters_nothing(
    error: type[Exception],
) -> None:
    classifier = StubClassifier()
    classifier.broken, classifier.broken_error = True, error
    rig = ServiceRig(unit_settings(batching={"max_batch_size": 64}), classifier=classifier)
    rig.send_many(30)
    with rig:
        health = rig.service.health
        rig.wait(lambda: classifier.failures >= 2 or rig.dead_letters(), what="the runtime to fail")
        rig.wait(lambda: not health.snapshot().ready or rig.dead_letters(), what="readiness to drop")
        assert rig.dead_letters() == []
        assert rig.metric("ready") == 0
        rig.wait(lambda: rig.transport.last_consumer.paused() == {P0}, what="consumption to pause")
        assert rig.committed(0) == 0

        classifier.broken = False
        rig.wait(lambda: rig.committed_to_end() and health.snapshot().ready, what="recovery")
    assert rig.dead_letters() == []
    assert rig.metric("dead_letters_total", reason="inference_failed") == 0
    assert sorted(set(rig.sources()[0])) == list(range(30))
