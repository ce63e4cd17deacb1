"""The compute worker's failure paths: handlers left before retrying, a failed device is
fatal, and nothing of a swapped-out model is kept (checked with the garbage collector off)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from stream_classifier.errors import DeviceFailedError
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream.compute import ComputeWorker


class Activations:
    """Stands for what a failed pass allocated (device memory, on a GPU)."""


class Scripted:
    """A Classifier whose ``infer`` runs ``behaviour`` on the batch's texts."""

    version = "v-scripted"
    base_model = ""
    device = "cpu"
    precision = "fp32"

    def __init__(self, behaviour: Callable[[list[str]], NDArray[np.float32]]) -> None:
        self.labels = ["a", "b"]
        self.behaviour = behaviour
        self.calls: list[int] = []

    def prepare(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    def infer(self, prepared: list[str]) -> NDArray[np.float32]:
        self.calls.append(len(prepared))
        return self.behaviour(prepared)

    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float32]:
        return self.infer(self.prepare(texts))


def _uniform(texts: list[str]) -> NDArray[np.float32]:
    return np.full((len(texts), 2), 0.5, dtype=np.float32)


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _worker(classifier: Scripted) -> ComputeWorker[int]:
    return ComputeWorker(classifier, Metrics(CollectorRegistry()), depth=4)


def test_one_by_one_runs_after_the_batch_failure_is_dropped(no_gc: None) -> None:
    failed_batch: list[weakref.ref[Activations]] = []
    alive_when_retrying: list[bool] = []

    def behaviour(texts: list[str]) -> NDArray[np.float32]:
        if len(texts) > 1:
            activations = Activations()
            failed_batch.append(weakref.ref(activations))
            raise ValueError("a kernel refused this batch")
        alive_when_retrying.append(any(ref() is not None for ref in failed_batch))
        if texts[0] == "poison":
            raise ValueError("this text breaks the model")
        return _uniform(texts)

    worker = _worker(Scripted(behaviour))
    worker.start()
    worker.submit([0, 1, 2], ["x", "poison", "y"])
    result = worker.take(block=True, timeout_s=10)
    worker.stop(5)
    assert result is not None and result.broken is None
    assert list(result.failed) == [1] and "this text breaks the model" in result.failed[1]
    assert failed_batch and alive_when_retrying and not any(alive_when_retrying)


def test_a_failed_device_stops_the_worker_and_no_message_is_blamed() -> None:
    def behaviour(texts: list[str]) -> NDArray[np.float32]:
        raise DeviceFailedError("the cuda:0 device failed and its context is unusable")

    classifier = Scripted(behaviour)
    worker = _worker(classifier)
    worker.start()
    worker.submit([0, 1], ["x", "y"])
    with pytest.raises(DeviceFailedError, match="context is unusable"):
        worker.take(block=True, timeout_s=10)
    assert classifier.calls == [2]  # no one-by-one retries, no canary: the device is gone
    worker.submit([2], ["z"])
    with pytest.raises(DeviceFailedError):
        worker.take(block=True, timeout_s=10)
    assert classifier.calls == [2]  # later batches never reach the model
    worker.stop(5)


def test_nothing_keeps_a_swapped_out_model_alive(no_gc: None) -> None:
    old, new = Scripted(_uniform), Scripted(_uniform)
    worker = _worker(old)
    worker.submit([0], ["prepared for the old model"])
    worker.swap(new)
    worker.start()
    result = worker.take(block=True, timeout_s=10)
    assert result is not None and result.classifier is new and new.calls == [1]
    gone = weakref.ref(old)
    del old
    try:
        assert gone() is None  # the job prepared for it went with its batch
    finally:
        worker.stop(5)


def test_a_failed_device_stops_the_service_non_zero_and_dead_letters_nothing() -> None:
    from tests.fakes.classifier import StubClassifier
    from tests.fakes.harness import ServiceRig, wait_until

    stub = StubClassifier()
    stub.broken, stub.broken_error = True, DeviceFailedError
    rig = ServiceRig(classifier=stub)
    rig.send_many(5)
    rig.__enter__()
    try:
        wait_until(lambda: rig.error is not None, what="the service to stop on the failed device")
    finally:
        rig.stop()
    assert isinstance(rig.error, DeviceFailedError) and rig.error.exit_code == 3  # `serve` exits 3
    assert rig.outputs() == [] and rig.dead_letters() == []  # no message is blamed
    assert rig.committed() == 0  # the batch is read again by the restarted process
    assert not rig.service.health.snapshot().ready
