#!/usr/bin/env bash
# The CUDA backend's checks and benchmarks on a GPU machine, from a binary built elsewhere.
#
#   scripts/device/check.sh [STAGE...]        stages: kernels smoke sanitize peers llama1b snapshot resume ttft (default: all)
#
# Needs the stripped x86-64 binary at target/device/driftwood (build: cargo build --release && strip -o
# target/device/driftwood target/release/driftwood) and, for the test stage, test binaries under
# target/device/tests/. Writes JSON and logs under $OUT (default: target/device-out).
# At most 8 files come back from a device run: with BUNDLE=FILE, everything under $out is also packed into
# that one tar.gz, repacked after every stage (put FILE under the run's $OUT and point OUT elsewhere).
#   kernels   the prefill kernels one by one against PyTorch, and timed next to PyTorch's attention and GEMMs
#             (scripts/device/kernels/check_prefill_kernels.py): $out/kernels.json
#   smoke     verify on the pinned and managed placements (JSON), and `bench gpu` on the bundled model:
#             logits and greedy tokens against the CPU backend (decode, and prefill from position 0 and after
#             a cached prefix), prefill times, batch-1 and batched decode (5 sequences, run padded to 8, and 16)
#   sanitize  compute-sanitizer memcheck over a short `bench gpu` run on the bundled model (6 sequences, run
#             with 2 padding steps, past one 256-key attention split), whose prefills run
#             in chunks of 64 tokens
#   peers     a Llama-3.2-1B-shaped random bf16 model generated on the device (bench/peers/make_llama1b.py);
#             transformers eager, a static-cache CUDA-graph PyTorch loop and a batched PyTorch decode on it,
#             plus transformers' golden logits (scripts/device/peers/torch_peers.sh)
#   llama1b   `bench gpu` on that model: logits and greedy tokens against the CPU backend and against the
#             golden logits, prefill of 16/128/1024 tokens against the CPU, prefill times at 24/128/1024/4096,
#             128-token prompt + 256 generated per placement, then batched decode of 1, 8, 32, 64, 128 and 256
#             sequences × 1024 tokens (each batch size's greedy tokens checked against the CPU backend)
#   snapshot  session snapshot save/restore vs re-prefill on the GPU (pinned and managed actors) at 24, 1024,
#             4096 tokens
#   resume    a session saved on the GPU resumes on the CPU and one saved on the CPU on the GPU; whole actors
#             (managed and pinned) saved and resumed on the GPU: $out/resume.txt
#   serve     (not in the default set) 64 sessions x 5 turns through the server's continuous batching on the
#             GPU (serve_load), then 16 x 3 with every turn restored from its snapshot (--hibernate), beside
#             `bench gpu` at 32 and 64 sequences x 256 tokens: $out/serve-cuda.json, serve-cuda-hibernate.json,
#             $out/gpu-serve-raw.json
#   ttft      time to first token through `driftwood serve --backend cuda` (Llama-3.2-1B-shaped model) for a
#             1024-token prompt in a fresh actor (scripts/device/serve_ttft.py): $out/ttft.json
#   ab        (not in the default set) batch-1 decode of the Llama-3.2-1B-shaped model with each step option
#             against the defaults: early launch off (DRIFTWOOD_CUDA_PDL=0), the pinned-KV stage on
#             (DRIFTWOOD_CUDA_KV_STAGE=1): $out/ab.json
#   profile   (not in the default set) Nsight Compute per-kernel time and DRAM bytes of decode: batch 1, and 64
#             sequences (attention at ~1024 tokens, GEMMs): $out/ncu-*.csv
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=${DRIFTWOOD_BIN:-target/device/driftwood}
out=${OUT:-target/device-out}
models=${MODELS:-/tmp/driftwood-models}
peers=${PEERS:-/tmp/driftwood-peers}   # the peers' full output (logs, .npy); its JSON is copied to $out/peers
mkdir -p "$out" "$models"
stages=${*:-kernels smoke sanitize peers llama1b snapshot resume ttft}
status=0
step() { echo "== $*" >&2; }
run() { "$@" || { echo "FAILED ($?): $*" >&2; status=1; }; }
# The Llama-3.2-1B-shaped model, generated once per machine.
llama1b_model() {
    [ -f "$models/llama1b/model.safetensors" ] && return
    step "make the Llama-3.2-1B-shaped model"
    run python3 bench/peers/make_llama1b.py --out "$models/llama1b" > /tmp/make_llama1b.log 2>&1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$out/gpu.csv" 2>&1

for stage in $stages; do
    case $stage in
    kernels)
        step "prefill kernels against PyTorch"
        PYTHONUNBUFFERED=1 run python3 scripts/device/kernels/check_prefill_kernels.py --out "$out/kernels.json" \
            > "$out/kernels.log" 2>&1
        tail -12 "$out/kernels.log" >&2
        ;;
    smoke)
        for p in pinned managed; do
            step "verify --placement $p"
            run "$bin" verify --backend cuda --placement "$p" --json > "$out/verify-$p.json" 2> "/tmp/verify-$p.log"
        done
        step "bench gpu (bundled model)"
        run "$bin" bench gpu --gen-tokens 64 --check-tokens 32 --batch 5,16 --context 256 --batch-steps 8 \
            --out "$out/gpu-mini.json" > /dev/null 2> "$out/gpu-mini.log"
        ;;
    sanitize)
        step "compute-sanitizer memcheck"
        sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        run "$sanitizer" --tool memcheck --leak-check full --error-exitcode 3 \
            "$bin" bench gpu --prompt-tokens 8 --gen-tokens 8 --check-tokens 4 --batch 6 --context 300 \
            --batch-steps 2 --prefill-chunk 64 --prefill-check-tokens 200 --prefill-tokens 200 --prefill-reps 1 \
            --no-write > "$out/memcheck.log" 2>&1
        tail -5 "$out/memcheck.log" >&2
        ;;
    llama1b)
        llama1b_model
        step "bench gpu (Llama-3.2-1B-shaped)"
        golden=()
        for g in "$peers/golden.json" target/device/golden.json; do
            [ -f "$g" ] && { golden=(--golden "$g"); break; }
        done
        run "$bin" bench gpu --model "$models/llama1b" --prompt-tokens 128 --gen-tokens 256 --check-tokens 8 \
            --batch 1,8,32,64,128,256 --context 1024 --batch-steps 32 "${golden[@]}" --out "$out/gpu-llama1b.json" \
            > /dev/null 2> "$out/gpu-llama1b.log"
        ;;
    snapshot)
        llama1b_model
        for p in pinned managed; do
            step "bench snapshot (Llama-3.2-1B-shaped, $p)"
            suffix=$([ "$p" = pinned ] && echo "" || echo "-$p")
            run "$bin" bench snapshot --backend cuda --placement "$p" --model "$models/llama1b" --context 24 \
                --context 1024 --context 4096 --reps 3 --out "$out/snapshot-cuda$suffix.json" > /dev/null \
                2> "/tmp/snapshot-$p.log"
            grep context "/tmp/snapshot-$p.log" >&2
        done
        ;;
    resume)
        # A session saved on the GPU (bf16 KV) resumes on the CPU, and one saved on the CPU resumes on the GPU;
        # each continuation is compared with the same 32 tokens generated without a break on the backend that
        # resumes. $out/resume.txt holds the texts; a failed save or resume fails the stage.
        step "sessions across backends (bundled model)"
        d=$(mktemp -d)
        gen() { "$bin" generate --temperature 0 "$@" 2>> "$d/log"; }
        for pair in "cuda cpu" "cpu cuda"; do
            set -- $pair
            run gen --backend "$1" --prompt "Once upon a time" --max-tokens 16 --save-session "$d/$1.safetensors" \
                > "$d/first-$1.txt"
            run gen --backend "$2" --resume "$d/$1.safetensors" --max-tokens 16 > "$d/resumed-$1-on-$2.txt"
            run gen --backend "$2" --prompt "Once upon a time" --max-tokens 32 > "$d/whole-$2.txt"
            whole=$(cat "$d/whole-$2.txt"); joined="$(cat "$d/first-$1.txt")$(cat "$d/resumed-$1-on-$2.txt")"
            same=$([ "$whole" = "$joined" ] && echo yes || echo no)
            { echo "saved on $1, resumed on $2: continuation equals $2's unbroken run: $same"
              echo "  unbroken: $whole"; echo "  resumed:  $joined"; } >> "$out/resume.txt"
        done
        # Whole actors saved and resumed on the GPU: a managed actor's snapshot takes its KV rows from the
        # device (crates/host/src/kv_rows.rs), a pinned actor's reads its memory from the CPU. Each continuation
        # must equal the unbroken CUDA run; the two files are compared byte for byte (recorded).
        step "whole-actor snapshots on the GPU (bundled model), managed and pinned"
        for p in managed pinned; do
            run gen --backend cuda --placement "$p" --prompt "Once upon a time" --max-tokens 16 \
                --save-actor "$d/actor-$p.dwa" > "$d/actor-first-$p.txt"
            run gen --backend cuda --placement "$p" --resume-actor "$d/actor-$p.dwa" --max-tokens 16 \
                > "$d/actor-resumed-$p.txt"
            whole=$(cat "$d/whole-cuda.txt"); joined="$(cat "$d/actor-first-$p.txt")$(cat "$d/actor-resumed-$p.txt")"
            same=$([ "$whole" = "$joined" ] && echo yes || echo no)
            [ "$same" = yes ] || { echo "FAILED: the $p actor's resumed run differs" >&2; status=1; }
            { echo "actor saved and resumed on cuda ($p): continuation equals the unbroken run: $same"
              echo "  resumed:  $joined"; } >> "$out/resume.txt"
        done
        identical=$(cmp -s "$d/actor-managed.dwa" "$d/actor-pinned.dwa" && echo yes || echo no)
        echo "managed actor snapshot (KV rows from the device) byte-identical to the pinned one's: $identical" \
            >> "$out/resume.txt"
        cat "$out/resume.txt" >&2
        ;;
    serve)
        # Serving on the GPU next to the raw batched bench: 64 sessions × 5 turns through the server's
        # continuous batching (serve_load, built here: cargo build --release -p driftwood-serve --example
        # serve_load, stripped to target/device/serve_load), then `bench gpu` at 32 and 64 sequences × 256
        # tokens, about the sessions' contexts (the server's passes carry 30-40 sequences on average). Sessions hold 2048 tokens (the random-weight model's replies tokenize
        # long, and five turns pass 512) in 160 MiB of managed memory each (64 MiB of it KV cache).
        llama1b_model
        step "serve_load --backend cuda (Llama-3.2-1B-shaped, 64 sessions x 5 turns)"
        run "${SERVE_LOAD_BIN:-target/device/serve_load}" --backend cuda --model "$models/llama1b" --sessions 64 \
            --turns 5 --workers 64 --max-tokens 32 --max-seq 2048 --memory-mib 160 --out "$out/serve-cuda.json" > /dev/null 2> "$out/serve-cuda.log"
        tail -2 "$out/serve-cuda.log" >&2
        # Every turn from a snapshot: actors are released after each turn and restored for the next, so the
        # snapshots (KV rows copied from the device) are read back under load.
        step "serve_load --hibernate --backend cuda (16 sessions x 3 turns, restored every turn)"
        run "${SERVE_LOAD_BIN:-target/device/serve_load}" --backend cuda --model "$models/llama1b" --sessions 16 \
            --turns 3 --workers 16 --max-tokens 32 --max-seq 2048 --memory-mib 160 --hibernate \
            --out "$out/serve-cuda-hibernate.json" > /dev/null 2> "$out/serve-cuda-hibernate.log"
        tail -2 "$out/serve-cuda-hibernate.log" >&2
        step "bench gpu: 32 and 64 sequences x 256 tokens"
        run "$bin" bench gpu --model "$models/llama1b" --skip-cpu --prompt-tokens 16 --gen-tokens 16 \
            --prefill-tokens 24 --prefill-check-tokens 16 --prefill-reps 1 --batch 32,64 --context 256 \
            --batch-steps 32 --out "$out/gpu-serve-raw.json" > /dev/null 2> "$out/gpu-serve-raw.log"
        ;;
    ttft)
        llama1b_model
        step "time to first token through serve (1024-token prompt)"
        run python3 scripts/device/serve_ttft.py --bin "$bin" --model "$models/llama1b" --tokens 1024 \
            --out "$out/ttft.json" > /tmp/ttft.log 2>&1
        tail -2 /tmp/ttft.log >&2
        ;;
    ab)
        llama1b_model
        rm -f /tmp/ab-*.json
        # The first run, with the defaults, also checks logits and greedy tokens against the CPU backend (bench
        # gpu exits non-zero on disagreement); every run's greedy tokens must equal the others'.
        cpu=()
        for v in "1 0" "0 0" "1 1"; do
            set -- $v
            step "batch 1, DRIFTWOOD_CUDA_PDL=$1 DRIFTWOOD_CUDA_KV_STAGE=$2"
            DRIFTWOOD_CUDA_PDL=$1 DRIFTWOOD_CUDA_KV_STAGE=$2 run "$bin" bench gpu \
                --model "$models/llama1b" "${cpu[@]}" --check-tokens 8 --prompt-tokens 128 --gen-tokens 256 \
                --batch 0 --prefill-tokens 24 --prefill-check-tokens 16 --prefill-reps 1 \
                --out "/tmp/ab-pdl$1-stage$2.json" > /dev/null 2>> /tmp/ab.log
            cpu=(--skip-cpu)
        done
        python3 -c 'import json,sys; json.dump({f.split("/ab-")[1][:-5]: json.load(open(f)) for f in sys.argv[1:]}, sys.stdout, indent=1)' \
            /tmp/ab-*.json > "$out/ab.json"
        run python3 -c 'import json,sys
runs = json.load(open(sys.argv[1]))
for name, r in runs.items():
    r = r["results"]
    print(name, " ".join("%s %.3f ms" % (p["placement"], p["decode_ms_per_token"]) for p in r["runs"]))
tokens = {tuple(p["first_tokens"]) for r in runs.values() for p in r["results"]["runs"]}
print("greedy tokens equal across runs:", len(tokens) == 1)
sys.exit(0 if len(tokens) == 1 else 1)' "$out/ab.json" >&2
        ;;
    profile)
        # Nsight Compute per-kernel device time and DRAM traffic of decode on the Llama-3.2-1B-shaped model:
        # where the next optimization should go. b1: 4 batch-1 steps (82 kernels each) of the managed placement
        # after a 128-token prompt and 8 steps;
        # b64-attn: decode attention of 64 sequences at ~1024 tokens (the last steps of the cache fill and the
        # timed steps); b64: every kernel of 64-sequence steps at a short context (the GEMMs), plus the few
        # prefill GEMMs of the batch-1 part.
        llama1b_model
        ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
        metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
        # Clocks and caches as in a real run (ncu otherwise locks base clocks and flushes caches per kernel).
        ncu_bin="$ncu_bin --clock-control none --cache-control none"
        common=(bench gpu --model "$models/llama1b" --skip-cpu --prefill-tokens 24 --prefill-check-tokens 16 --prefill-reps 1 --no-write)
        step "ncu: batch-1 decode kernels"
        run $ncu_bin --metrics "$metrics" --kernel-name 'regex:^(gemv_r.*|gemv_swiglu_r.*|attn_lanes.*|embed)$' \
            --launch-skip 1970 --launch-count 328 --print-summary per-kernel --csv \
            "$bin" "${common[@]}" --prompt-tokens 128 --gen-tokens 16 --batch 0 > "$out/ncu-b1.csv" 2> "$out/ncu-b1.log"
        step "ncu: 64-sequence decode attention at ~1024 tokens"
        run $ncu_bin --metrics "$metrics" --kernel-name 'regex:^attn_split.*$' \
            --launch-skip 16340 --launch-count 48 --print-summary per-kernel --csv \
            "$bin" "${common[@]}" --prompt-tokens 8 --gen-tokens 1 --batch 64 --context 1024 --batch-steps 2 \
            > "$out/ncu-b64-attn.csv" 2> "$out/ncu-b64-attn.log"
        step "ncu: 64-sequence decode steps at 16 tokens"
        run $ncu_bin --metrics "$metrics" --print-summary per-kernel --csv \
            "$bin" "${common[@]}" --prompt-tokens 8 --gen-tokens 1 --batch 64 --context 16 --batch-steps 2 \
            > "$out/ncu-b64.csv" 2> "$out/ncu-b64.log"
        ;;
    peers)
        step "PyTorch peers"
        run bash scripts/device/peers/torch_peers.sh "$peers" "$models/llama1b" > "$peers.log" 2>&1
        mkdir -p "$out/peers"
        cp "$peers"/torch_decode.json "$peers"/torch_batched.json "$peers"/torch_prefill.json "$peers"/golden.json \
            "$out/peers/" 2>/dev/null
        tail -3 "$peers.log" >&2
        ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
    esac
    # Packed after every stage, so a run cut off by its time limit still brings back the stages it finished.
    if [ -n "${BUNDLE:-}" ]; then
        tar czf "$BUNDLE.tmp" -C "$out" . && mv "$BUNDLE.tmp" "$BUNDLE" || status=1
    fi
done
exit $status
