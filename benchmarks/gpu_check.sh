#!/usr/bin/env bash
# The one GPU check (H100/H200, no network): GPU tests + `stream-classifier bench` on CUDA.
#
#   benchmarks/gpu_check.sh             # on the GPU machine, from the repo root, with .whl/ carried
#   benchmarks/gpu_check.sh --dry-run   # here, on the CPU, tiny sizes: checks the script itself
#
# Results (<= 8 files) go to $OUT (default /tmp/gpu-check). GPU_CHECK_BUDGET_S (default 380)
# bounds all stages together; each stage also has its own time box (see gpu_check.py).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-380}"
started=$(date +%s)

if [ "${1:-}" = "--dry-run" ]; then
    PY="${PYTHON:-.venv/bin/python}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    exec "$PY" benchmarks/gpu_check.py --out "$OUT" --budget "$BUDGET" --dry-run
fi

{
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
    echo "== install carried wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -5
} > "$OUT/env.log" 2>&1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - >> "$OUT/env.log" 2>&1 <<'PY'
import torch, transformers, sentence_transformers, kafka, confluent_kafka
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
print("transformers", transformers.__version__, "sentence-transformers", sentence_transformers.__version__)
print("kafka-python", kafka.__version__, "confluent-kafka", confluent_kafka.version(), "librdkafka", confluent_kafka.libversion())
PY
echo "[gpu-check] install + env: $(( $(date +%s) - started )) s (see $OUT/env.log)"
tail -3 "$OUT/env.log"
python3 benchmarks/gpu_check.py --out "$OUT" --budget "$(( BUDGET - ($(date +%s) - started) ))"
