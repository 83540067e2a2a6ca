#!/usr/bin/env bash
# Draws bench/results/gpu-scaling.png (the README's batch-scaling curve) with bench/plot_gpu_scaling.py;
# arguments go to the script unchanged (see its docstring). Uses the machine's python3 if it has matplotlib,
# otherwise a venv at target/plot-venv (made once, matplotlib installed by pip).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=python3
if ! "$py" -c "import matplotlib" 2>/dev/null; then
    venv=$root/target/plot-venv
    if ! "$venv/bin/python" -c "import matplotlib" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet matplotlib
    fi
    py=$venv/bin/python
fi
exec "$py" "$root/bench/plot_gpu_scaling.py" "$@"
