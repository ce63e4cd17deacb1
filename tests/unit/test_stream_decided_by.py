"""Every output says which model decided it, when the runtime says (the cascade's ``Decided``).

The runtimes here label their rows with the cascade's own :func:`decided` (a real
``Decided`` array); the loop reads the names without importing the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from stream_classifier.config import OutputSettings
from stream_classifier.model.cascade import STUDENT, TRANSFORMER, decided
from stream_classifier.ops.metrics import Metrics
from stream_classifier.stream import codec
from stream_classifier.stream.classifier import decided_by
from stream_classifier.stream.compute import ComputeWorker
from stream_classifier.stream.output import PublishedBatch
from stream_classifier.transport import Record
from tests.fakes.classifier import StubClassifier, StubPrepared
from tests.fakes.harness import ServiceRig, body, header

pytestmark = pytest.mark.timeout(60)


def _names(texts: Sequence[str]) -> list[str]:
    return [STUDENT if "easy" in text else TRANSFORMER for text in texts]


class CascadeLike(StubClassifier):
    """The stub's probabilities, labelled per row as a cascade labels them."""

    def infer(self, prepared: StubPrepared) -> NDArray[np.float32]:
        return decided(super().infer(prepared), _names(prepared.texts))


def test_the_helper_reads_the_names_only_when_they_cover_the_rows() -> None:
    plain = np.full((2, 2), 0.5, dtype=np.float32)
    labelled = decided(plain, [STUDENT, TRANSFORMER])
    assert decided_by(plain, 2) is None
    assert decided_by(labelled, 2) == (STUDENT, TRANSFORMER)
    assert decided_by(labelled, 3) is None
    assert decided_by(labelled[1:], 1) is None  # a derived array carries no names


def test_the_batch_and_the_one_by_one_paths_both_carry_the_deciders() -> None:
    worker: ComputeWorker[int] = ComputeWorker(
        CascadeLike(poison=lambda text: text == "poison"), Metrics(CollectorRegistry()), depth=4
    )
    worker.start()
    worker.submit([0, 1], ["easy one", "hard one"])
    worker.submit([0, 1, 2], ["easy", "poison", "hard"])  # fails as a batch: run one by one
    batch = worker.take(block=True, timeout_s=10)
    alone = worker.take(block=True, timeout_s=10)
    worker.stop(5)
    assert batch is not None and batch.decided_by == (STUDENT, TRANSFORMER)
    assert alone is not None and list(alone.failed) == [1]
    assert alone.decided_by == [STUDENT, "", TRANSFORMER]


def test_a_plain_runtime_says_nothing() -> None:
    worker: ComputeWorker[int] = ComputeWorker(StubClassifier(), Metrics(CollectorRegistry()), depth=4)
    worker.start()
    worker.submit([0], ["hello"])
    result = worker.take(block=True, timeout_s=10)
    worker.stop(5)
    assert result is not None and result.decided_by is None


def _encoded(decider: str | None) -> codec.OutgoingRecord:
    rows, _ = codec.published_rows(np.array([[0.25, 0.75]], dtype=np.float32))
    encoder = codec.OutputEncoder(OutputSettings(), decisions=False, max_request_size=1_048_576)
    out, _ = encoder.encode(
        Record("in", 2, 17, b"k", b"{}", (), 1_700_000_000_000),
        codec.Decoded("hi", "a-1"),
        labels=["neg", "pos"],
        row=rows[0],
        label="pos",
        top_label="pos",
        abstained=False,
        model_version="v1",
        topic="out",
        decided_by=decider,
    )
    return out


def test_the_codec_writes_the_decider_only_when_given() -> None:
    out = _encoded(STUDENT)
    payload = codec.json.loads(out.value or b"")
    assert list(payload) == ["id", "label", "probabilities", "model_version", "decided_by", "source"]
    assert payload["decided_by"] == STUDENT
    assert dict(out.headers)[codec.DECIDED_BY_HEADER] == STUDENT.encode()
    plain = _encoded(None)
    assert "decided_by" not in codec.json.loads(plain.value or b"")
    assert codec.DECIDED_BY_HEADER not in dict(plain.headers)


def test_each_output_of_the_loop_names_its_decider() -> None:
    rig = ServiceRig(classifier=CascadeLike())
    with rig:
        for i in range(6):
            rig.send(f"easy {i}" if i % 2 else f"hard {i}", id=f"m{i}")
        rig.wait(lambda: len(rig.outputs()) == 6 and rig.committed_to_end())
    for output in rig.outputs():
        payload = body(output)
        expected = STUDENT if int(payload["id"][1:]) % 2 else TRANSFORMER
        assert payload["decided_by"] == expected
        assert header(output, codec.DECIDED_BY_HEADER) == expected.encode()


def test_the_loop_with_a_plain_runtime_writes_no_decider() -> None:
    rig = ServiceRig()
    with rig:
        rig.send("hello", id="m0")
        rig.wait(lambda: len(rig.outputs()) == 1 and rig.committed_to_end())
    (output,) = rig.outputs()
    assert "decided_by" not in body(output) and header(output, codec.DECIDED_BY_HEADER) is None


def test_the_publish_hook_sees_each_messages_decider() -> None:
    seen: list[tuple[str, str]] = []

    def hook(batch: PublishedBatch) -> list[tuple[int, codec.OutgoingRecord]]:
        seen.extend(zip(batch.texts, batch.decided_by, strict=True))
        return []

    rig = ServiceRig(classifier=CascadeLike(), publish_hook=hook)
    with rig:
        for i in range(4):
            rig.send(f"easy {i}" if i % 2 else f"hard {i}", id=f"m{i}")
        rig.wait(lambda: len(rig.outputs()) == 4 and rig.committed_to_end())
    assert sorted(seen) == [
        ("easy 1", STUDENT),
        ("easy 3", STUDENT),
        ("hard 0", TRANSFORMER),
        ("hard 2", TRANSFORMER),
    ]


def test_the_publish_hook_of_a_plain_runtime_sees_no_deciders() -> None:
    seen: list[Sequence[str]] = []

    def hook(batch: PublishedBatch) -> list[tuple[int, codec.OutgoingRecord]]:
        seen.append(batch.decided_by)
        return []

    rig = ServiceRig(publish_hook=hook)
    with rig:
        rig.send("hello", id="m0")
        rig.wait(lambda: len(rig.outputs()) == 1 and rig.committed_to_end())
    assert seen == [()]
