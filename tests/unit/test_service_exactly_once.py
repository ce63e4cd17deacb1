"""Exactly-once on the in-memory transport: what a rebalance in the middle of a transaction
commits or aborts, the shutdown deadline, and the stable transactional id.

The fake calls the rebalance listener after the partitions moved (kafka-python's order):
a revoked partition given back to this member is still in ``assignment()``, one that went
elsewhere is not.
"""

from __future__ import annotations

import time

import pytest

from stream_classifier.transport import Partition
from tests.fakes.harness import IN, ServiceRig, unit_settings

P0, P1 = Partition(IN, 0), Partition(IN, 1)


def _eos(**processing: object) -> ServiceRig:
    settings = unit_settings(
        processing={"guarantee": "exactly_once", "commit_interval_ms": 60_000, **processing}
    )
    return ServiceRig(settings, partitions=2)


def test_a_revoked_partition_that_went_elsewhere_aborts_the_open_transaction() -> None:
    rig = _eos()
    rig.send_many(20, partitions=2)
    with rig:
        rig.wait(
            lambda: len(rig.outputs(read_committed=False)) == 20, what="20 outputs in the open transaction"
        )
        rig.transport.rebalance(revoke=[P1])  # P1 goes to another member
        rig.wait(lambda: rig.transport.calls["abort_transaction"] == 1, what="the abort")
        rig.wait(lambda: len(rig.outputs(read_committed=False)) == 30, what="P0 re-read")
    # P1's outputs were never committed without P1's offsets: its next owner publishes them once.
    assert rig.sources() == {0: list(range(10))}
    assert P1 not in rig.broker.committed()
    assert rig.transport.calls["commit"] == 0


def test_a_revoked_partition_still_held_commits_the_transaction_with_its_offsets() -> None:
    rig = _eos()
    rig.send_many(20, partitions=2)
    with rig:
        rig.wait(
            lambda: len(rig.outputs(read_committed=False)) == 20, what="20 outputs in the open transaction"
        )
        rig.transport.rebalance(revoke=[P0, P1], assign=[P0, P1])
        # committed at the revoke, long before the next commit interval
        rig.wait(lambda: rig.broker.committed() == {P0: 10, P1: 10}, what="the commit on revoke")
        assert rig.transport.calls["abort_transaction"] == 0
        rig.send_many(4, partitions=2)
        rig.wait(lambda: len(rig.outputs(read_committed=False)) == 24, what="the later outputs")
    assert rig.sources() == {0: list(range(12)), 1: list(range(12))}


def test_an_aborted_transaction_leaves_no_commit_point_behind() -> None:
    rig = _eos(commit_interval_ms=50)
    rig.send_many(10, partitions=1)  # P0 only: P1 has nothing pending
    rig.transport.fail("commit_transaction", times=1)
    with rig:
        rig.wait(lambda: rig.transport.calls["abort_transaction"] == 1, what="the abort")
        rig.wait(rig.committed_to_end, what="the re-read committed")
    assert rig.sources() == {0: list(range(10))}
    assert rig.broker.commit_history[0] == {P0: 10}  # P1 commits no point of the aborted transaction


def test_shutdown_honours_shutdown_timeout_in_exactly_once_mode() -> None:
    rig = _eos(shutdown_timeout_s=1.0)
    rig.transport.hold_acks()
    rig.send_many(6, partitions=2)
    with rig:
        rig.wait(lambda: rig.transport.held_acks == 6, what="six outputs awaiting their acks")
        started = time.monotonic()
        rig.service.stop()
        assert rig._thread is not None
        rig._thread.join(timeout=10)
        elapsed = time.monotonic() - started
        assert not rig._thread.is_alive() and elapsed < 4, f"stopped after {elapsed:.1f} s"
    assert rig.sources() == {}  # the unacknowledged transaction was aborted, not committed


def test_the_transactional_id_is_the_setting() -> None:
    rig = _eos(transactional_id="classifier-7", commit_interval_ms=50)
    rig.send_many(2)
    with rig:
        rig.wait(rig.committed_to_end)
    assert [p.transactional_id for p in rig.transport.producers] == ["classifier-7"]


def test_the_default_transactional_id_names_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "classifier-0")
    rig = _eos(commit_interval_ms=50)
    rig.send_many(2)
    with rig:
        rig.wait(rig.committed_to_end)
    assert [p.transactional_id for p in rig.transport.producers] == ["stream-classifier-classifier-0"]
