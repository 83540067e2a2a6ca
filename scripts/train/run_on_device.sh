#!/usr/bin/env bash
# Train driftwood-mini on a GPU machine.
#
# Expects the output of scripts/train/prepare_data.py in $DATA_DIR (default
# .data: train.bin, val.bin, tokenizer/) and writes the Hugging Face model
# folder to $OUT (default ./out).
#
#   python3 scripts/train/prepare_data.py                 # any machine, CPU only
#   OUT=out bash scripts/train/run_on_device.sh     # GPU machine
#
# By default it trains the three configurations in RUNS below one after the
# other (about a minute each on one H100), keeps the one with the lowest
# validation loss, and writes it plus sweep.json (every run's losses and
# samples) to $OUT. With SWEEP=0 it trains once with the arguments given.
#
# Needs python3 with torch, transformers, safetensors, tokenizers, numpy.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR="${DATA_DIR:-.data}"
OUT="${OUT:-out}"
PER_RUN_LIMIT="${PER_RUN_LIMIT:-170}"   # hard cap (s) per run; training stops at --time-budget and saves
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

if [ "${SWEEP:-1}" = "0" ]; then
  exec timeout "$PER_RUN_LIMIT" python3 scripts/train/train_mini.py --data-dir "$DATA_DIR" --out "$OUT" "$@"
fi

RUNS=(
  "--max-steps 700 --time-budget 60"
  "--max-steps 1000 --dropout 0.1 --time-budget 80"
  "--max-steps 1400 --dropout 0.1 --time-budget 110"
)
WORK="$(mktemp -d)"
for i in "${!RUNS[@]}"; do
  echo "=== run $i: ${RUNS[$i]} $*"
  # shellcheck disable=SC2086
  timeout "$PER_RUN_LIMIT" python3 scripts/train/train_mini.py --data-dir "$DATA_DIR" \
    --out "$WORK/run$i" ${RUNS[$i]} "$@" 2>&1 | grep -v "Writing model" || echo "run $i failed"
done

python3 - "$WORK" "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = []
for d in sorted(work.glob("run*")):
    f = d / "train_log.json"
    if f.exists():
        log = json.loads(f.read_text())
        runs.append((log["best_val_loss"], d.name, d, log))
if not runs:
    sys.exit("no run finished")
runs.sort(key=lambda r: r[0])
best = runs[0]
out.mkdir(parents=True, exist_ok=True)
for f in best[2].iterdir():
    shutil.copy(f, out / f.name)
summary = [{"run": name, "chosen": name == best[1], "best_val_loss": v,
            "best_step": log["best_step"], "steps": log["steps"], "train_time_s": log["train_time_s"],
            "args": log["args"], "evals": log["evals"], "samples": log["samples"]}
           for v, name, _, log in sorted(runs, key=lambda r: r[1])]
(out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
for s in summary:
    print(f"{s['run']}: best val {s['best_val_loss']:.4f} at step {s['best_step']}"
          f"{'  <- chosen' if s['chosen'] else ''}")
print("written to", out, ":", sorted(p.name for p in out.iterdir()))
PY
