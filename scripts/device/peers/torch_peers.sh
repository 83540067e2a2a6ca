#!/usr/bin/env bash
# PyTorch peers of the CUDA decode benchmark, on one CUDA machine, no network needed.
#
#   scripts/device/peers/torch_peers.sh OUTDIR [MODEL_DIR]
#
# Makes the Llama-3.2-1B-shaped random model (bench/peers/make_llama1b.py) in MODEL_DIR
# (default OUTDIR/llama1b-shaped-bf16) unless it is there, then writes into OUTDIR:
#   torch_decode.json    batch-1 decode, 128-token prompt, 256 generated tokens: transformers
#                        eager and the static-cache CUDA-graph decoder (bench/peers/torch_decode.py)
#   golden.json          transformers' last-position logits for the fixed 16-token prompt and
#                        their .npy files, with a 16-token greedy continuation
#   torch_batched.json   batches 1, 8, 32, 64, 128, 256 (BATCHES), 1024-token context, 32 timed steps
#                        (bench/peers/torch_batched.py)
#   torch_prefill.json   prefill of 24/128/1024/4096 tokens (transformers with SDPA, the static decoder) and
#                        safetensors.torch.load_file onto the GPU of the same sessions' bf16 KV
#                        (bench/peers/torch_prefill.py)
# and a log of each step. Knobs: PYTHON (python3), BATCHES (1,8,32,64,128,256), SEED (model seed, default the
# generator's own).
set -euo pipefail
out=${1:?usage: torch_peers.sh OUTDIR [MODEL_DIR]}
model=${2:-$out/llama1b-shaped-bf16}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/../../.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ ! -f "$model/model.safetensors" ]; then
    $py "$here/bench/peers/make_llama1b.py" --out "$model" ${SEED:+--seed "$SEED"} 2>&1 | tee "$out/make_llama1b.log"
fi
$py "$here/bench/peers/torch_decode.py" --model "$model" --prompt-tokens 128 --gen-tokens 256 \
    --out "$out/torch_decode.json" --golden "$out/golden.json" --golden-prompt-tokens 16 2>&1 | tee "$out/torch_decode.log"
$py "$here/bench/peers/torch_batched.py" --model "$model" --batch "${BATCHES:-1,8,32,64,128,256}" --context 1024 --steps 32 \
    --out "$out/torch_batched.json" 2>&1 | tee "$out/torch_batched.log"
$py "$here/bench/peers/torch_prefill.py" --model "$model" --tokens 24,128,1024,4096 \
    --out "$out/torch_prefill.json" 2>&1 | tee "$out/torch_prefill.log"
