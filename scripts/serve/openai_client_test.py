"""A 3-turn chat through the `openai` client against `driftwood serve`, streaming and non-streaming, with
the server restarted between turns 2 and 3 (gracefully, then with SIGKILL). Driven by openai_client_test.sh."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai

BIN = os.environ["DRIFTWOOD_BIN"]
STORE = os.environ["DRIFTWOOD_STORE"]
PORT = int(os.environ.get("DRIFTWOOD_PORT", "8181"))
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "driftwood-mini"


def start():
    log = open(os.path.join(STORE, "..", "server.log"), "ab")
    proc = subprocess.Popen([BIN, "serve", "--addr", f"127.0.0.1:{PORT}", "--store", STORE], stderr=log, stdout=log)
    for _ in range(600):
        try:
            urllib.request.urlopen(BASE + "/health", timeout=1)
            return proc
        except Exception:
            time.sleep(0.1)
    raise SystemExit("the server did not come up")


def metrics():
    text = urllib.request.urlopen(BASE + "/metrics").read().decode()
    return {l.split(" ")[0]: float(l.split(" ")[1]) for l in text.splitlines() if l and not l.startswith("#")}


def turn(client, session, messages, stream):
    extra = {"headers": {"X-Session-Id": session}}
    if stream:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                                seed=7, stream=True, stream_options={"include_usage": True},
                                                extra_headers=extra["headers"])
        text, usage = "", None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, seed=7,
                                       extra_headers=extra["headers"])
    return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens


def conversation(client, session, stream, restart):
    """Turns 1 and 2, a restart (None, 'graceful' or 'kill'), turn 3. Returns the replies and turn 3's numbers."""
    global server
    questions = ["Who was Elizabeth?", "And her sister?", "What did Darcy say?"]
    messages, replies, turn3 = [], [], None
    for i, q in enumerate(questions):
        if i == 2 and restart:
            if restart == "graceful":
                server.send_signal(signal.SIGTERM)
                assert server.wait(timeout=60) == 0, "graceful shutdown exits 0"
            else:
                server.kill()  # SIGKILL: no chance to save anything
                server.wait()
            server = start()
            before = metrics()
        messages.append({"role": "user", "content": q})
        text, prompt, cached = turn(client, session, messages, stream)
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
        if i == 2:
            turn3 = (prompt, cached)
    result = {"session": session, "stream": stream, "restart": restart, "replies": replies,
              "turn3_prompt_tokens": turn3[0], "turn3_cached_tokens": turn3[1],
              "turn3_prefill_tokens": turn3[0] - turn3[1]}
    if restart:
        after = metrics()
        result["restored"] = after["driftwood_sessions_restored_total"] - before["driftwood_sessions_restored_total"]
        result["turn3_prefill_metric"] = after["driftwood_prefill_tokens_total"] - before["driftwood_prefill_tokens_total"]
    return result


server = start()
client = openai.OpenAI(base_url=BASE + "/v1", api_key="not-needed")
print("models:", [m.id for m in client.models.list().data])
results = []
failures = []
for stream in (False, True):
    base = conversation(client, f"plain-{int(stream)}", stream, None)
    results.append(base)
    for restart in ("graceful", "kill"):
        r = conversation(client, f"{restart}-{int(stream)}", stream, restart)
        results.append(r)
        if r["replies"] != base["replies"]:
            failures.append(f"{restart}/stream={stream}: turn replies differ from the uninterrupted run")
        if r["restored"] != 1:
            failures.append(f"{restart}/stream={stream}: /metrics shows {r['restored']} restores, expected 1")
        if r["turn3_prefill_metric"] != r["turn3_prefill_tokens"]:
            failures.append(f"{restart}/stream={stream}: metric prefill {r['turn3_prefill_metric']} != usage {r['turn3_prefill_tokens']}")
        if r["turn3_prefill_tokens"] != base["turn3_prefill_tokens"]:
            failures.append(f"{restart}/stream={stream}: turn 3 evaluated {r['turn3_prefill_tokens']} tokens, "
                            f"{base['turn3_prefill_tokens']} without a restart")
# Bad input through the client: a clear error, not a crash.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    failures.append("an unknown model was accepted")
except openai.NotFoundError as e:
    print("unknown model ->", e.status_code, e.body.get("code") if isinstance(e.body, dict) else e.body)
server.send_signal(signal.SIGTERM)
server.wait(timeout=60)
for r in results:
    print(json.dumps({k: v for k, v in r.items() if k != "replies"}))
print("turn 3 reply (kill -9, streaming):", repr(results[-1]["replies"][2]))
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("OK: 3-turn chats streaming and non-streaming; graceful and kill -9 restarts between turns 2 and 3 restore "
      "the session and evaluate only the new message")
