"""Time to first token through `driftwood serve` for a long prompt (standard library only).

    python3 scripts/device/serve_ttft.py --bin target/device/driftwood --model DIR --tokens 1024 \
        [--backend cuda] [--repeats 5] --out FILE.json

Starts the server on 127.0.0.1 (a free port, a temporary store), waits for /health, then sends --repeats streaming
`/v1/completions` requests without a session key (each runs in a fresh actor: nothing is cached) whose prompt is
--tokens tokens long (text grown until the server's `usage.prompt_tokens` says so), with max_tokens 1, and times
from sending the request to the first server-sent event that carries text. Stops the server (SIGTERM, then
SIGKILL after 10 s). Writes {backend, model, prompt_tokens, ttft_ms: [...], ttft_ms_median}.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, stream=False, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:  # say why the server refused, then stop
        raise SystemExit(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = tempfile.mkdtemp()
    log = open(os.path.join(store, "server.log"), "w")
    server = subprocess.Popen(
        [args.bin, "serve", "--addr", f"127.0.0.1:{port}", "--model", args.model, "--backend", args.backend,
         "--store", os.path.join(store, "s"), "--max-seq", str(args.tokens + 64), "--memory-mib", "4096"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the server exited: see " + log.name)
                time.sleep(0.1)
        model_id = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        words = [f"value_{i} = compute(item_{i % 97}, limit={i % 13})" for i in range(4 * args.tokens)]

        def prompt_of(n_words, salt):
            return f"# run {salt}\n" + "\n".join(words[:n_words])

        # Grow the text until it has the asked number of tokens (the server counts them).
        n_words, prompt_tokens = max(8, args.tokens // 20), 0
        for _ in range(12):
            usage = json.load(post(base + "/v1/completions",
                                   {"model": model_id, "prompt": prompt_of(n_words, 0), "max_tokens": 1,
                                    "temperature": 0}))["usage"]
            prompt_tokens = usage["prompt_tokens"]
            if abs(prompt_tokens - args.tokens) <= args.tokens // 50:
                break
            n_words = max(1, round(n_words * args.tokens / max(prompt_tokens, 1)))
        ttft = []
        for r in range(args.repeats):
            body = {"model": model_id, "prompt": prompt_of(n_words, r + 1), "max_tokens": 1, "temperature": 0,
                    "stream": True}
            start = time.perf_counter()
            with post(base + "/v1/completions", body) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[5:]).get("choices") or []
                    if choices and choices[0].get("text"):
                        ttft.append((time.perf_counter() - start) * 1e3)
                        break
        result = {"backend": args.backend, "model": os.path.basename(os.path.normpath(args.model)),
                  "prompt_tokens": prompt_tokens, "ttft_ms": ttft,
                  "ttft_ms_median": statistics.median(ttft) if ttft else None}
        print(json.dumps(result))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
