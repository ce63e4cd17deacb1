"""The training child's limits: an address-space cap only on the CPU, a GPU memory share on
CUDA, and the job's embedding cache keyed by how the body runs, not by the body alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from stream_classifier.config import Settings
from stream_classifier.errors import TrainingError
from stream_classifier.learn import child_limits
from stream_classifier.learn.challenger import _train_and_score, write_examples
from stream_classifier.learn.retrainer import job_spec
from stream_classifier.model.examples import Example

CHILD = """
import json, os, resource, sys, torch
from stream_classifier.learn.child_limits import apply_child_limits
before = os.nice(0)
device = apply_child_limits(
    device="cpu", nice=5, torch_threads=1, max_memory_mb=4096, gpu_memory_fraction=0.25
)
print(json.dumps({"device": str(device), "nice": os.nice(0) - before,
                  "expected_nice": min(19, before + 5) - before,
                  "as": resource.getrlimit(resource.RLIMIT_AS)[0], "threads": torch.get_num_threads()}))
"""


def test_on_the_cpu_the_child_is_niced_threaded_and_address_space_capped() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got.pop("nice") == got.pop("expected_nice")  # os.nice stops at 19
    assert got == {"device": "cpu", "as": 4096 * 1024 * 1024, "threads": 1}


def test_an_address_space_cap_is_refused_on_cuda_before_any_limit_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA reserves virtual address space far beyond physical memory: under RLIMIT_AS its
    # context does not start. The refusal names what to use, and nothing was applied yet.
    monkeypatch.setattr(child_limits, "resolve_device", lambda device: torch.device("cuda", 0))
    niced: list[int] = []
    monkeypatch.setattr(child_limits.os, "nice", niced.append)
    with pytest.raises(TrainingError, match=r"gpu_memory_fraction, or train on retrain.device=cpu"):
        child_limits.apply_child_limits(
            device="cuda", nice=10, torch_threads=1, max_memory_mb=4096, gpu_memory_fraction=0.5
        )
    assert niced == []


def test_on_cuda_the_child_gets_a_gpu_memory_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_limits, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(child_limits.os, "nice", lambda n: 0)
    monkeypatch.setattr(child_limits.torch, "set_num_interop_threads", lambda n: None)
    shares: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: shares.append((f, d))
    )
    threads = torch.get_num_threads()
    device = child_limits.apply_child_limits(
        device="cuda", nice=10, torch_threads=threads, max_memory_mb=None, gpu_memory_fraction=0.3
    )
    assert device == torch.device("cuda", 0) and shares == [(0.3, torch.device("cuda", 0))]


def test_settings_refuse_an_address_space_cap_on_a_cuda_retrain_device(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"retrain\.gpu_memory_fraction"):
        Settings(retrain={"device": "cuda:0", "max_memory_mb": 4096})
    settings = Settings(model={"device": "cuda"}, retrain={"device": "cpu", "max_memory_mb": 4096})
    spec = job_spec(settings, tmp_path, tmp_path / "cache")
    assert (spec.device, spec.max_memory_mb, spec.gpu_memory_fraction) == ("cpu", 4096, 0.5)
    assert (
        job_spec(Settings(model={"device": "cpu"}), tmp_path, tmp_path).device == "cpu"
    )  # unset: model.device


def test_the_embedding_cache_is_keyed_by_device_precision_and_length(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    train = [Example(f"refund my invoice {i}", "billing") for i in range(4)] + [
        Example(f"parcel still not delivered {i}", "shipping") for i in range(4)
    ]
    cache = tmp_path / "cache"
    files = []
    for length in (16, 32):
        work = tmp_path / f"work-{length}"
        work.mkdir()
        write_examples(work / "train.jsonl", train)
        settings = Settings(
            model={"device": "cpu", "precision": "fp32", "max_seq_length": length}, retrain={"mode": "head"}
        )
        _train_and_score(job_spec(settings, tiny_model_dir, cache), work)
        files.append(sorted(p.name for p in cache.glob("*.npz")))
    assert len(files[0]) == 1 and len(files[1]) == 1 and files[0] != files[1]
    assert files[0][0].endswith("-cpu-fp32-16.npz") and files[1][0].endswith("-cpu-fp32-32.npz")
