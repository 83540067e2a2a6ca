#!/usr/bin/env bash
# Train driftwood-mini on a GPU machine.
#
# Expects the output of scripts/train/prepare_data.py in $DATA_DIR (default .data:
# train.bin, val.bin, tokenizer/) and writes the Hugging Face model folder to
# $OUT (default ./out). Extra arguments are passed to train_mini.py.
#
#   python3 scripts/train/prepare_data.py            # on any machine, CPU only
#   OUT=models/driftwood-mini bash scripts/train/run_on_device.sh
#
# Needs python3 with torch, transformers, safetensors, tokenizers, numpy.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR="${DATA_DIR:-.data}"
OUT="${OUT:-out}"
# Hard wall-clock cap (seconds) for the whole job; training itself stops at
# --time-budget and then saves, so this is only a safety net.
WALL_LIMIT="${WALL_LIMIT:-540}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout "$WALL_LIMIT" python3 scripts/train/train_mini.py \
  --data-dir "$DATA_DIR" --out "$OUT" "$@"
