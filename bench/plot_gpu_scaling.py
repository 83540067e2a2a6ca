#!/usr/bin/env python3
"""Draws the batch-scaling curve of `driftwood bench gpu --batch 1,8,...` for the README.

    python3 bench/plot_gpu_scaling.py [GPU_JSON] [PEERS_JSON] [--out PNG]

GPU_JSON is `bench gpu`'s result file: its `results.batched` is one run per batch size ({batch,
context, tokens_per_s, roofline_tokens_per_s, ...}; an object in older files). PEERS_JSON is
bench/peers/torch_batched.py's output ({results: [{batch, tokens_per_s, variant, ...}]}); its
headline tokens_per_s (the faster of the plain and compiled variants) is drawn at the batch sizes
it has, and it is left out if the file is missing. Draws decode tokens/s against batch size (log2
x axis, ticks at the measured sizes): Driftwood, PyTorch, and the roofline (weights once plus
every sequence's bf16 KV per step at the measured copy bandwidth). Defaults, in the repository's
bench/results: gpu-cuda.json, peers-torch-batched-cuda.json, --out gpu-scaling.png. Needs
matplotlib (bench/plot.sh makes a venv with it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402


def batched_runs(gpu: dict) -> list[dict]:
    b = gpu.get("results", {}).get("batched")
    if isinstance(b, dict):
        b = [b]
    rows = [r for r in (b or []) if isinstance(r, dict) and r.get("batch")]
    return sorted(rows, key=lambda r: r["batch"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results = Path(__file__).resolve().parent / "results"
    ap.add_argument("gpu", nargs="?", type=Path, default=results / "gpu-cuda.json")
    ap.add_argument("peers", nargs="?", type=Path, default=results / "peers-torch-batched-cuda.json")
    ap.add_argument("--out", type=Path, default=results / "gpu-scaling.png")
    args = ap.parse_args()

    gpu = json.loads(args.gpu.read_text())
    runs = batched_runs(gpu)
    if not runs:
        print(f"{args.gpu} has no batched runs", file=sys.stderr)
        return 1
    peers: dict[int, dict] = {}
    if args.peers.exists():
        for r in json.loads(args.peers.read_text()).get("results", []):
            if isinstance(r, dict) and r.get("batch") and r.get("tokens_per_s"):
                peers[int(r["batch"])] = r
    else:
        print(f"no {args.peers}: drawing without the PyTorch peer", file=sys.stderr)

    batches = [int(r["batch"]) for r in runs]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(batches, [r["roofline_tokens_per_s"] for r in runs], "--", color="gray", label="roofline (weights + KV per step)")
    ax.plot(batches, [r["tokens_per_s"] for r in runs], "o-", color="tab:blue", label="Driftwood")
    torch_b = [b for b in batches if b in peers]
    if torch_b:
        ax.plot(torch_b, [peers[b]["tokens_per_s"] for b in torch_b], "s-", color="tab:orange",
                label="PyTorch, static cache + CUDA graph (compiled)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("actors stepping together (batch size)")
    ax.set_ylabel("decode tokens/s (all actors)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    res = gpu.get("results", {})
    device = res.get("device", "?")
    context = runs[0].get("context", "?")
    model = Path(str(res.get("model", ""))).name or "?"
    ax.set_title(f"Batched decode, {model} on {device}, {context}-token context per actor")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
