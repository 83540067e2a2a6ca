#!/usr/bin/env bash
# Drives `driftwood serve` with the official `openai` Python client: a 3-turn chat with a session key,
# streaming and non-streaming, with graceful and SIGKILL restarts between turns 2 and 3.
# Installs the client in a virtual environment under target/; never run by CI (it needs the package index).
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$TARGET/serve-openai-venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "installing the openai Python client into $VENV (needs the package index; once)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet openai
fi
cargo build --release --quiet
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/store"
DRIFTWOOD_BIN="$TARGET/release/driftwood" DRIFTWOOD_STORE="$WORK/store" "$VENV/bin/python" scripts/serve/openai_client_test.py \
  || { echo "--- server log"; tail -n 40 "$WORK/server.log"; exit 1; }
