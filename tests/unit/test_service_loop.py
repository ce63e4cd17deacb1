"""The serving loop on the in-memory transport and the stub classifier: no broker, no model.

Every test drives the real :class:`StreamService` through :class:`ServiceRig` and checks
public behaviour only: records in the fake output and dead-letter topics, offsets committed
to the fake group, metrics read through the registry.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stream_classifier.errors import BrokerUnavailableError
from stream_classifier.stream.codec import OutgoingRecord
from stream_classifier.stream.service import PublishedBatch
from stream_classifier.transport import Partition
from tests.fakes.classifier import StubClassifier
from tests.fakes.harness import DLQ, IN, OUT, ServiceRig, body, header, unit_settings
from tests.fakes.transport import Sent

pytestmark = pytest.mark.timeout(60)

P0, P1 = Partition(IN, 0), Partition(IN, 1)


def source_offset(sent: Sent) -> tuple[int, int] | None:
    """(partition, offset) of the input an output is for; None for other records."""
    if sent.topic != OUT:
        return None
    source = json.loads(sent.value or b"{}")["source"]
    return source["partition"], source["offset"]


def test_every_input_gets_one_output_in_order_and_offsets_reach_the_end() -> None:
    with ServiceRig(partitions=3) as rig:
        sent = []
        for i in range(60):
            text = f"buy spam now {i}" if i % 3 == 0 else f"hello {i}"
            headers = (("trace", f"t{i}".encode()), ("empty", None))
            sent.append(rig.send(text, partition=i % 3, key=f"k{i}".encode(), headers=headers, id=f"m{i}"))
        rig.wait(lambda: len(rig.outputs()) == 60 and rig.committed_to_end(), what="60 outputs, committed")
        rig.wait(lambda: rig.metric("consumer_lag_messages", topic=IN, partition="2") == 0, what="lag 0")

    outputs = rig.outputs()
    assert rig.sources(outputs) == {p: list(range(20)) for p in range(3)}  # once each, in input order
    by_id = {body(r)["id"]: r for r in outputs}
    for record in sent:
        out = by_id[json.loads(record.value or b"")["id"]]
        text = json.loads(record.value or b"")["text"]
        assert out.key == record.key
        assert body(out)["label"] == ("spam" if "spam" in text else "ham")
        assert body(out)["model_version"] == "stub-1"
        assert header(out, "model.version") == b"stub-1"
        assert header(out, "label") == body(out)["label"].encode()
    assert rig.dead_letters() == []
    assert rig.metric("messages_consumed_total", topic=IN) == 60
    assert rig.metric("predictions_total", label="spam", model_version="stub-1") == 20
    assert rig.metric("predictions_total", label="ham", model_version="stub-1") == 40
    assert rig.metric("outputs_total", topic=OUT) == 60
    assert rig.metric("end_to_end_latency_seconds_count") == 60
    assert rig.metric("in_flight_messages") == 0


def test_bad_inputs_are_dead_lettered_with_their_reason_and_the_good_ones_go_on() -> None:
    settings = unit_settings(input={"max_bytes": 2048})
    rig = ServiceRig(settings, classifier=StubClassifier(poison=lambda text: "poison" in text))
    bad = {
        1: (b"{not json", "invalid_json"),
        2: (None, "null_value"),  # a tombstone, with a null header value
        3: (b"[1, 2]", "not_an_object"),
        4: (b'{"id": 1}', "missing_text"),
        5: (b'{"text": "   "}', "empty_text"),
        6: (b'{"text": 7}', "text_not_string"),
        7: (b"\xff\xfe", "invalid_utf8"),
        8: (json.dumps({"text": "x" * 3000}).encode(), "too_large"),
        9: (json.dumps({"text": "a poison text"}).encode(), "inference_failed"),
        10: (b'{"text": "\\ud800 lone"}', "invalid_text"),
    }
    with rig:
        for offset in range(12):
            if offset in bad:
                rig.send_raw(bad[offset][0], key=b"k", headers=(("h", None), ("g", b"v")))
            else:
                rig.send(f"good {offset}")
        rig.wait(rig.committed_to_end, what="every input committed")

    assert rig.sources() == {0: [0, 11]}
    letters = {
        offset: (reason, letter)
        for (_, offset, reason), letter in zip(rig.dead_letter_sources(), rig.dead_letters(), strict=True)
    }
    assert sorted(letters) == sorted(bad)  # one dead letter each
    for offset, (value, reason) in bad.items():
        found, letter = letters[offset]
        assert found == reason
        assert (letter.key, letter.value) == (b"k", value)  # the input as it came, reason in the headers
        assert ("h", None) in letter.headers and ("g", b"v") in letter.headers
        assert header(letter, "error.message")
    for reason in Counter(reason for _, reason in bad.values()):
        assert rig.metric("dead_letters_total", reason=reason) == 1


def test_backpressure_never_lets_more_than_max_in_flight_be_consumed_uncommitted() -> None:
    settings = unit_settings(batching={"max_in_flight": 20}, kafka={"max_poll_records": 7})
    rig = ServiceRig(settings, partitions=2)
    rig.transport.hold_acks()
    rig.send_many(100, partitions=2)
    with rig:
        consumer_paused = lambda: rig.transport.last_consumer.paused() == {P0, P1}  # noqa: E731
        rig.wait(lambda: rig.transport.held_acks == 20 and consumer_paused(), what="the consumer to pause")
        polls = rig.transport.calls["poll"]
        rig.wait(lambda: rig.transport.calls["poll"] >= polls + 5, what="more polls")
        assert rig.metric("in_flight_messages") == 20
        assert rig.metric("messages_consumed_total", topic=IN) == 20  # paused at exactly the bound
        assert rig.committed(0) + rig.committed(1) == 0

        rig.transport.release_acks(out_of_band=True)  # as kafka-python's I/O thread would
        rig.wait(rig.committed_to_end, what="everything committed")
    assert rig.transport.max_uncommitted == 20
    assert sorted(o for offsets in rig.sources().values() for o in offsets) == sorted(list(range(50)) * 2)


def test_messages_finished_but_not_committed_count_against_max_in_flight() -> None:
    """The duplicate bound: what a crash re-reads is at most ``max_in_flight`` messages."""
    settings = unit_settings(
        batching={"max_in_flight": 20}, kafka={"max_poll_records": 7}, processing={"commit_interval_ms": 200}
    )
    rig = ServiceRig(settings, partitions=2)
    rig.transport.fail("commit", times=25)  # every output acknowledged, no commit lands for ~5 s
    rig.send_many(100, partitions=2)
    with rig:
        paused = lambda: rig.transport.consumers and rig.transport.last_consumer.paused() == {P0, P1}  # noqa: E731
        rig.wait(paused, what="the consumer to pause")
        polls = rig.transport.calls["poll"]
        rig.wait(lambda: rig.transport.calls["poll"] >= polls + 5, what="more polls")
        assert rig.transport.scripted("commit") > 0  # still failing: the bound held, not a commit
        assert rig.metric("messages_consumed_total", topic=IN) == 20
        assert rig.metric("in_flight_messages") == 20
        rig.wait(rig.committed_to_end, timeout_s=30, what="everything committed once commits land")
    assert rig.transport.max_uncommitted <= 20


@pytest.mark.parametrize("at", ["callback", "send"])
def test_a_transient_produce_failure_rewinds_and_republishes_without_loss(at: str) -> None:
    rig = ServiceRig(partitions=2)
    rig.transport.fail_sends(BrokerUnavailableError, when=lambda s: source_offset(s) == (0, 5), at=at)
    rig.send_many(40, partitions=2)
    with rig:
        rig.wait(rig.committed_to_end, what="everything committed")
    sources = rig.sources()
    assert set(sources[0]) == set(range(20)) and sources[1] == list(range(20))
    assert sources[0][:5] == [0, 1, 2, 3, 4]  # the acknowledged prefix is not republished
    resumed = sources[0].index(5)
    assert sources[0][resumed:] == list(range(5, 20))  # re-emitted from the failed message onwards
    assert rig.metric("produce_errors_total") == 1


def test_a_partition_revoked_and_reassigned_is_read_again_from_its_oldest_dropped_message() -> None:
    rig = ServiceRig(partitions=2)
    rig.classifier.hold()
    rig.send_many(20, partitions=2)
    with rig:
        rig.wait(lambda: rig.classifier.held and rig.metric("messages_consumed_total", topic=IN) == 20)
        rebalances = rig.metric("rebalances_total")
        rig.transport.rebalance(revoke=[P0], assign=[P0])  # kafka-python keeps P0's fetch position
        rig.wait(lambda: rig.metric("rebalances_total") == rebalances + 2, what="the rebalance")
        assert rig.transport.last_consumer.assignment() == {P0, P1}
        assert rig.service.assignment == {P0, P1}  # as the callbacks said, read without the client
        rig.classifier.release()
        rig.wait(lambda: rig.committed_to_end() and len(rig.sources().get(0, [])) >= 10)
    sources = rig.sources()
    assert sources == {0: list(range(10)), 1: list(range(10))}  # none were published before the revoke


def test_lost_partitions_drop_their_results_and_are_read_again_from_the_committed_offset() -> None:
    rig = ServiceRig()
    rig.send_many(10)
    with rig:
        rig.wait(rig.committed_to_end, what="the first ten")
        rig.classifier.hold()
        rig.send_many(10)
        rig.wait(lambda: rig.classifier.held and rig.metric("messages_consumed_total", topic=IN) == 20)
        rebalances = rig.metric("rebalances_total")
        rig.transport.rebalance(lost=[P0])
        rig.wait(lambda: rig.metric("rebalances_total") == rebalances + 1, what="the loss")
        assert rig.transport.last_consumer.assignment() == set()
        assert rig.service.assignment == set()
        rig.classifier.release()  # the results of the lost partition come back and are discarded
        rig.wait(lambda: rig.classifier.held == 0, what="the held batch to finish")
        rig.transport.rebalance(assign=[P0])  # back, from the committed offset 10
        rig.wait(rig.committed_to_end, what="everything committed")
    assert rig.sources() == {0: list(range(20))}  # nothing published twice, nothing lost
    assert rig.metric("messages_consumed_total", topic=IN) == 30


def test_a_failing_publish_hook_is_logged_and_the_service_goes_on() -> None:
    calls: list[int] = []

    def hook(batch: PublishedBatch) -> list[tuple[int, OutgoingRecord]]:
        calls.append(len(batch.records))
        if len(calls) == 1:
            raise RuntimeError("the hook is broken")
        return [(0, OutgoingRecord("extras", f"{batch.records[0].offset}".encode()))]

    rig = ServiceRig(publish_hook=hook)
    with rig:
        rig.send_many(4)
        rig.wait(lambda: len(rig.outputs()) == 4 and rig.committed_to_end(), what="the first batch")
        rig.send_many(4)
        rig.wait(lambda: len(rig.outputs()) == 8 and rig.committed_to_end(), what="the second batch")
    assert rig.sources() == {0: list(range(8))}
    assert len(calls) >= 2
    assert len(rig.broker.records("extras")) == len(calls) - 1  # the hook's records, from the second call


def test_a_failing_commit_is_retried_until_it_succeeds() -> None:
    rig = ServiceRig()
    rig.transport.hold_acks()
    rig.send_many(10)
    with rig:
        rig.wait(lambda: rig.transport.held_acks == 10, what="ten outputs awaiting their acks")
        rig.transport.fail("commit", times=3)  # the commit of offset 10 fails three times
        rig.transport.release_acks()
        rig.wait(rig.committed_to_end, what="the commit to succeed")
        rig.send_many(5)
        rig.wait(lambda: rig.committed(0) == 15, what="later commits")
    assert rig.metric("commit_errors_total") == 3
    assert rig.broker.commit_history[0] == {P0: 10}
    assert rig.sources() == {0: list(range(15))}


def test_poll_failures_are_retried_and_nothing_is_lost() -> None:
    rig = ServiceRig()
    rig.send_many(10)
    with rig:
        rig.wait(rig.committed_to_end, what="the first ten")
        rig.transport.fail("poll", times=2)
        rig.send_many(10)
        rig.wait(lambda: rig.committed_to_end() and rig.transport.scripted("poll") == 0)
    assert rig.sources() == {0: list(range(20))}


def test_exactly_once_aborts_a_failed_transaction_reconnects_and_publishes_each_output_once() -> None:
    settings = unit_settings(processing={"guarantee": "exactly_once", "commit_interval_ms": 50})
    rig = ServiceRig(settings, partitions=2)
    rig.transport.fail("commit_transaction", times=1)
    rig.send_many(30, partitions=2)
    with rig:
        rig.wait(rig.committed_to_end, what="everything committed")
        rig.send_many(6, partitions=2)
        rig.wait(lambda: rig.committed_to_end() and len(rig.outputs()) == 36, what="later transactions")

    assert rig.sources() == {0: list(range(18)), 1: list(range(18))}  # read_committed: once each
    assert len(rig.outputs(read_committed=False)) > 36  # the aborted transaction's records
    assert rig.metric("commit_errors_total") == 1
    assert rig.transport.calls["commit"] == 0  # offsets only through transactions
    assert rig.transport.calls["abort_transaction"] == 1
    consumers, producers = rig.transport.consumers, rig.transport.producers
    assert len(consumers) == 2 and all(c.read_committed for c in consumers)  # reconnected
    assert len(producers) == 2 and len({p.transactional_id for p in producers}) == 1  # stable per instance
    assert all((p.transactional_id or "").startswith("stream-classifier-") for p in producers)


def test_graceful_shutdown_runs_what_is_batched_publishes_and_commits() -> None:
    settings = unit_settings(
        batching={"max_batch_size": 64, "max_wait_ms": 60_000}, processing={"commit_interval_ms": 60_000}
    )
    rig = ServiceRig(settings)
    with rig:
        rig.send_many(10)
        rig.wait(lambda: rig.metric("messages_consumed_total", topic=IN) == 10, what="ten consumed")
        assert rig.outputs() == [] and rig.committed(0) == 0  # batched, not due
    assert rig.sources() == {0: list(range(10))}
    assert rig.committed(0) == 10
    assert rig.transport.last_consumer.closed and all(p.closed for p in rig.transport.producers)
    assert rig.metric("ready") == 0


def test_a_swapped_model_serves_from_the_next_batch_on() -> None:
    rig = ServiceRig()
    with rig:
        rig.send_many(5)
        rig.wait(lambda: rig.committed(0) == 5)
        rig.service.swap_model(StubClassifier("stub-2"))  # type: ignore[arg-type]
        rig.send_many(5)
        rig.wait(lambda: rig.committed(0) == 10)
    versions = [body(r)["model_version"] for r in rig.outputs()]
    assert versions == ["stub-1"] * 5 + ["stub-2"] * 5
    assert rig.metric("model_swaps_total") == 1
    assert (
        rig.metric("model_info", version="stub-2", base_model="stub/base", device="cpu", precision="fp32")
        == 1
    )


def test_dead_letter_topic_is_separate_from_outputs() -> None:
    rig = ServiceRig()
    with rig:
        rig.send_raw(b"nope")
        rig.send("fine")
        rig.wait(rig.committed_to_end)
    assert [r.topic for r in rig.dead_letters()] == [DLQ]
    assert [r.topic for r in rig.outputs()] == [OUT]
