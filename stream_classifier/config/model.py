"""Which model to serve and how to run it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stream_classifier.config.base import Section


class ModelSettings(Section):
    """Which model to serve and how to run it."""

    path: str | None = Field(
        default=None,
        description="Model directory to serve; with 'retrain.model_store' it seeds an empty store once.",
    )
    device: str = Field(
        default="auto", description="'auto' (CUDA when torch sees a GPU), 'cpu', 'cuda' or 'cuda:N'."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description=(
            "'auto' on the CPU: bf16 autocast where the CPU has native bf16 (AMX or AVX512_BF16) and a "
            "warm-up probe finds it >= 1.15x fp32 within the AMP tolerance, else fp32; on CUDA: bf16 at "
            "compute capability >= 8.0, else fp16. Explicit bf16 on CUDA needs native support."
        ),
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="'int8' runs the body on ONNX Runtime with int8 weights (CPU only, the [int8] extra).",
    )
    max_seq_length: int | None = Field(
        default=None, ge=8, description="Tokens a text is truncated to; unset: the model's own maximum."
    )
    cascade: bool = Field(
        default=False,
        description=(
            "Opt-in: serve the model's cascade student (model2vec) in front of the transformer; the student "
            "decides the texts it is sure of, the transformer the rest, and each output says which decided "
            "('decided_by'). Needs the [cascade] extra; a promotion with it on builds the new version's "
            "student. A model directory without a student/ for its version serves the transformer alone "
            "(a cascade_unavailable warning event)."
        ),
    )
    trusted: bool = Field(
        default=False,
        description=(
            "Unpickle model_head.pkl without restriction (a pickle can run code): only for model directories "
            "you made or trust."
        ),
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in {"auto", "cpu", "cuda"}:
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")
