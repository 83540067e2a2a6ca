#!/usr/bin/env bash
# Regenerate bench/results/decode-cpu.json: CPU decode speed (tokens/s, batch 1) of Driftwood, candle
# and llama.cpp on the same SmolLM2-135M-shaped random-weight model, f32 and bf16, at 128 and 1024
# tokens of context, interleaved in one run on this machine.
#
#   scripts/bench_decode.sh
#
# Steps (each skipped when already done):
#   1. a Python venv at $BENCH_VENV (default /tmp/driftwood-bench-venv) with numpy, safetensors,
#      tokenizers, gguf and llama-cpp-python (built from source: CPU only, GGML_NATIVE=ON; ~20 min
#      on 2 cores);
#   2. the two model dirs (bench/peers/make_model.py) and their GGUF files (bench/peers/to_gguf.py)
#      under $BENCH_MODELS (default target/bench-models);
#   3. the candle peer (bench/peers/candle, release) and Driftwood (release);
#   4. BENCH_REPEATS sweeps of: for dtype in f32 bf16, for context in 128 1024: Driftwood, candle,
#      llama.cpp, one after another;
#   5. bench/results/decode-cpu.json (BENCH_OUT), with the median over the sweeps.
#
# Driftwood runs as `cargo run --release -- bench decode --model DIR --context N --json` (set
# DRIFTWOOD_CMD to use another command line, e.g. ./target/release/driftwood). A Driftwood failure
# (e.g. `bench decode` not there yet) is recorded in the result file and the peers still run.
# Never run by CI. Run it on an idle machine: see bench/peers/README.md.
# Knobs: BENCH_STEPS (64), BENCH_WARMUP (8), BENCH_REPEATS (3), BENCH_CONTEXTS ("128 1024"),
# BENCH_DTYPES ("f32 bf16"), BENCH_KV_DTYPE (Driftwood's KV cache dtype, bf16), CARGO_BUILD_JOBS (1),
# CMAKE_BUILD_PARALLEL_LEVEL (nproc).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

VENV=${BENCH_VENV:-/tmp/driftwood-bench-venv}
MODELS=${BENCH_MODELS:-target/bench-models}
STEPS=${BENCH_STEPS:-64}
WARMUP=${BENCH_WARMUP:-8}
REPEATS=${BENCH_REPEATS:-3}
CONTEXTS=${BENCH_CONTEXTS:-"128 1024"}
DTYPES=${BENCH_DTYPES:-"f32 bf16"}
OUT=${BENCH_OUT:-bench/results/decode-cpu.json}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}

# Pinned peer versions (reported in the result file).
PY_PKGS=(numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3 gguf==0.19.0)
LLAMA_CPP_PY=llama-cpp-python==0.3.36

log() { printf '[bench_decode] %s\n' "$*" >&2; }

# 1. Python venv with the peers.
PY="$VENV/bin/python"
if ! "$PY" -c 'import numpy, safetensors, tokenizers, gguf' 2>/dev/null; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "${PY_PKGS[@]}"
fi
if ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
  log "building $LLAMA_CPP_PY from source (CPU, native; this takes a while)"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip install --no-cache-dir "$LLAMA_CPP_PY"
fi

# 2. Models and GGUF files.
mkdir -p "$MODELS"
for dtype in $DTYPES; do
  dir="$MODELS/smollm2-135m-shaped-$dtype"
  if [[ ! -f "$dir/model.safetensors" || ! -f "$dir/tokenizer.json" ]]; then
    log "generating $dir"
    "$PY" bench/peers/make_model.py --dtype "$dtype" --out "$dir"
  fi
  if [[ ! -f "$dir.gguf" || "$dir.gguf" -ot "$dir/model.safetensors" ]]; then
    log "converting $dir to GGUF"
    "$PY" bench/peers/to_gguf.py "$dir" --out "$dir.gguf"
  fi
done

# 3. Builds.
log "building the candle peer"
(cd bench/peers/candle && CARGO_TARGET_DIR="$ROOT/bench/peers/candle/target" cargo build --release --locked --quiet)
CANDLE=bench/peers/candle/target/release/driftwood-bench-candle

RAW=$(mktemp -d "${TMPDIR:-/tmp}/bench-decode.XXXXXX")
trap 'rm -rf "$RAW"' EXIT

# Driftwood: `cargo run --release -- bench decode ...` unless DRIFTWOOD_CMD names another command
# line (e.g. an already built ./target/release/driftwood); it gets `bench decode --model DIR ...` appended.
DRIFTWOOD_BUILD_OK=1
if [[ -z "${DRIFTWOOD_CMD:-}" ]]; then
  log "building Driftwood"
  if ! cargo build --release --quiet 2>"$RAW/driftwood-build.err"; then
    DRIFTWOOD_BUILD_OK=0
    log "Driftwood build failed (recorded; peers still run)"
  fi
  DRIFTWOOD_CMD="cargo run --release --quiet --"
fi
read -r -a DW <<<"$DRIFTWOOD_CMD"
# Keep Driftwood from overwriting the merged result file when it supports --no-write.
DW_EXTRA=()
if [[ $DRIFTWOOD_BUILD_OK == 1 ]] && "${DW[@]}" bench decode --help 2>/dev/null | grep -q -- '--no-write'; then
  DW_EXTRA=(--no-write)
fi
# Driftwood's KV cache dtype for the comparison (its CPU default, bf16; llama.cpp's default cache is f16).
if [[ $DRIFTWOOD_BUILD_OK == 1 ]] && "${DW[@]}" bench decode --help 2>/dev/null | grep -q -- '--kv-dtype'; then
  DW_EXTRA+=(--kv-dtype "${BENCH_KV_DTYPE:-bf16}")
fi

# 4. Interleaved runs: BENCH_REPEATS sweeps; in each, per dtype and context, Driftwood then candle then
# llama.cpp. The result is the median over the sweeps (every sample is kept in the file).
run_one() { # rep engine dtype context outfile cmd...
  local rep=$1 engine=$2 dtype=$3 ctx=$4 out=$5
  shift 5
  local load rc=0
  read -r load _ </proc/loadavg || load=unknown
  log "sweep $rep: $engine $dtype context $ctx (load $load)"
  "$@" >"$out.out" 2>"$out.err" || rc=$?
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$engine" "$dtype" "$ctx" "$rc" "$out" "$load" >>"$RAW/runs.tsv"
  if [[ $rc != 0 ]]; then
    log "$engine $dtype $ctx failed (rc $rc): $(tail -n 3 "$out.err" | tr '\n' ' ')"
  fi
}
: >"$RAW/runs.tsv"
# Two-thread engines (llama.cpp's OpenMP spin-waits above all) slow down many times over when anything
# else runs: warn, and record the load average with every sample.
read -r LOAD1 _ </proc/loadavg || LOAD1=unknown
echo "$LOAD1" >"$RAW/load-start"
if awk -v l="$LOAD1" 'BEGIN { exit !(l + 0 > 0.5) }'; then
  log "warning: load average is $LOAD1 before the runs; the numbers will be low if something else is running"
fi
for rep in $(seq 1 "$REPEATS"); do
  for dtype in $DTYPES; do
    dir="$MODELS/smollm2-135m-shaped-$dtype"
    for ctx in $CONTEXTS; do
      base="$RAW/$rep-$dtype-$ctx"
      if [[ $DRIFTWOOD_BUILD_OK == 1 ]]; then
        run_one "$rep" driftwood "$dtype" "$ctx" "$base-driftwood" \
          "${DW[@]}" bench decode --model "$dir" --context "$ctx" --json "${DW_EXTRA[@]}"
      else
        cp "$RAW/driftwood-build.err" "$base-driftwood.err"
        : >"$base-driftwood.out"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" driftwood "$dtype" "$ctx" build-failed "$base-driftwood" - >>"$RAW/runs.tsv"
      fi
      run_one "$rep" candle "$dtype" "$ctx" "$base-candle" \
        "$CANDLE" --model "$dir" --context "$ctx" --steps "$STEPS" --warmup "$WARMUP"
      run_one "$rep" llama.cpp "$dtype" "$ctx" "$base-llama.cpp" \
        "$PY" bench/peers/llama_cpp_decode.py --gguf "$dir.gguf" --context "$ctx" --steps "$STEPS" --warmup "$WARMUP"
    done
  done
done

# 5. Merge.
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no -- . ':!bench/results' ':!README.md' 2>/dev/null)" ]]; then
  COMMIT="$COMMIT-dirty"
fi
mkdir -p "$(dirname "$OUT")"
# The command line, with the knobs that were set.
COMMAND="scripts/bench_decode.sh"
for v in DRIFTWOOD_CMD BENCH_STEPS BENCH_WARMUP BENCH_REPEATS BENCH_CONTEXTS BENCH_DTYPES BENCH_OUT; do
  if [[ -n "${!v:-}" ]]; then COMMAND="$v='${!v}' $COMMAND"; fi
done
read -r LOAD1_END _ </proc/loadavg || LOAD1_END=unknown
"$PY" - "$RAW/runs.tsv" "$OUT" "$COMMIT" "$(cat "$RAW/load-start")" "$LOAD1_END" "$STEPS" "$WARMUP" "$REPEATS" "$COMMAND" <<'PY'
import json, os, platform, statistics, sys, time

runs_path, out_path, commit, load_start, load_end, steps, warmup, repeats, command = sys.argv[1:10]


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]
                return [f for f in keep if f in flags]
    except OSError:
        pass
    return []


def json_docs(text):
    """Every JSON value in text: the whole text, else one per line."""
    text = text.strip()
    if not text:
        return []
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    docs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            try:
                docs.append(json.loads(line))
            except ValueError:
                pass
    return docs


def rate_rows(v):
    """Every object that carries a measured decode rate (key decode_tokens_per_s)."""
    if isinstance(v, dict):
        if isinstance(v.get("decode_tokens_per_s"), (int, float)):
            yield v
        for x in v.values():
            yield from rate_rows(x)
    elif isinstance(v, list):
        for x in v:
            yield from rate_rows(x)


def roofline_info(doc):
    """Driftwood's roofline figures (weight bytes per token, read bandwidth), wherever they sit."""
    if isinstance(doc, dict):
        if "weight_bytes_per_token" in doc and "read_bandwidth_gb_s" in doc:
            return doc
        for x in doc.values():
            r = roofline_info(x)
            if r:
                return r
    return None


samples, peers, errors, driftwood_raw, roofs = {}, {}, [], [], {}
for line in open(runs_path):
    rep, engine, dtype, ctx, rc, base, load = line.rstrip("\n").split("\t")
    ctx = int(ctx)
    out = open(base + ".out").read() if os.path.exists(base + ".out") else ""
    err = open(base + ".err").read() if os.path.exists(base + ".err") else ""
    if rc != "0":
        errors.append({"engine": engine, "dtype": dtype, "context": ctx, "sweep": int(rep), "exit": rc,
                       "error": "\n".join(err.strip().splitlines()[-12:])})
        continue
    found = False
    for doc in json_docs(out):
        if engine == "driftwood":
            driftwood_raw.append(doc)
            roof = roofline_info(doc)
            if roof:
                roofs.setdefault(dtype, []).append(roof)
        for row in rate_rows(doc):
            row_ctx = row.get("context", row.get("context_tokens", ctx))
            row_dtype = row.get("dtype", dtype)
            if row_ctx != ctx or row_dtype != dtype:
                continue
            samples.setdefault((engine, dtype, ctx), []).append((float(row["decode_tokens_per_s"]), load, row))
            found = True
            if engine != "driftwood" and "version" in row:
                peers[engine] = {"version": row["version"]}
                if "system_info" in row:
                    peers[engine]["system_info"] = row["system_info"]
    if not found:
        errors.append({"engine": engine, "dtype": dtype, "context": ctx, "sweep": int(rep), "exit": rc,
                       "error": "no decode tokens/s for this dtype and context in its output: "
                                + out.strip()[-400:]})

results = []
for (engine, dtype, ctx), ss in samples.items():
    rates = [x for x, _, _ in ss]
    r = {"engine": engine, "dtype": dtype, "context": ctx, "decode_tokens_per_s": statistics.median(rates),
         "samples": rates, "load_avg_1m": [l for _, l, _ in ss]}
    for extra in ("threads", "steps", "first_token", "kv_type", "flash_attn"):
        if extra in ss[0][2]:
            r[extra] = ss[0][2][extra]
    results.append(r)

# Greedy-token agreement after the same context (same weights, same token ids).
agree = {}
for dtype in sorted({r["dtype"] for r in results}):
    for ctx in sorted({r["context"] for r in results}):
        toks = {r["engine"]: r["first_token"] for r in results
                if r["dtype"] == dtype and r["context"] == ctx and "first_token" in r}
        if len(toks) > 1:
            agree[f"{dtype}/{ctx}"] = {"first_tokens": toks, "identical": len(set(toks.values())) == 1}

doc = {
    "bench": "decode",
    "machine": {"cpu": cpu_model(), "threads": os.cpu_count(), "os": sys.platform, "arch": platform.machine(),
                "cpu_features": cpu_flags(), "load_avg_1m_at_start": load_start, "load_avg_1m_at_end": load_end},
    "commit": commit,
    "command": command,
    "unix_time": int(time.time()),
    "model": "SmolLM2-135M-shaped Llama, random weights (bench/peers/make_model.py); batch 1, greedy",
    "protocol": f"per engine run: prefill the context in one pass, {warmup} untimed decode steps, then {steps} "
                "timed decode steps (Driftwood: its own bench decode protocol); tokens/s = timed steps / their wall "
                f"time, argmax included; {repeats} interleaved sweeps, decode_tokens_per_s is the median",
    "results": results,
    "peers": peers,
    "greedy_agreement": agree,
    "errors": errors,
}
if roofs:
    # What Driftwood measured: bytes of weights read per token and the machine's read bandwidth
    # (medians over the sweeps).
    by_dtype = {}
    for dt, rs in roofs.items():
        by_dtype[dt] = {"weight_bytes_per_token": rs[0]["weight_bytes_per_token"],
                        "read_bandwidth_gb_s": statistics.median(float(r["read_bandwidth_gb_s"]) for r in rs)}
        if all("roofline_tokens_per_s" in r for r in rs):
            by_dtype[dt]["roofline_tokens_per_s"] = statistics.median(float(r["roofline_tokens_per_s"]) for r in rs)
    head = "bf16" if "bf16" in by_dtype else sorted(by_dtype)[0]
    doc["roofline"] = {"dtype": head, **by_dtype[head], "by_dtype": by_dtype}
if driftwood_raw:
    doc["driftwood_output"] = driftwood_raw
with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")

print(f"{'engine':<10} {'dtype':<5} {'context':>7} {'tokens/s':>9}  samples", file=sys.stderr)
for r in results:
    print(f"{r['engine']:<10} {r['dtype']:<5} {r['context']:>7} {r['decode_tokens_per_s']:>9.1f}  "
          + " ".join(f"{x:.1f}" for x in r["samples"]), file=sys.stderr)
for e in errors:
    print(f"{e['engine']:<10} {e['dtype']:<5} {e['context']:>7}   failed: {e['error'].splitlines()[-1] if e['error'] else e['exit']}", file=sys.stderr)
print(f"wrote {out_path}", file=sys.stderr)
PY
