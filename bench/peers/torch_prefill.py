#!/usr/bin/env python3
"""PyTorch peers of GPU prefill and session restore, on the Llama-3.2-1B-shaped model.

    python3 bench/peers/torch_prefill.py --model DIR --tokens 24,128,1024,4096 --out FILE.json [--repeats 5]

Prefill: a prompt of N random token ids (torch.Generator().manual_seed(1234)), timed with CUDA events after two
warm-up passes, median of --repeats, for:

  transformers  LlamaForCausalLM in bf16 with attn_implementation="sdpa", model(ids, use_cache=True,
                logits_to_keep=1): a fresh dynamic KV cache filled per pass and only the last position's
                logits computed (what Driftwood's prefill returns to the guest), so the peer does no more work
                than it must;
  static        bench/peers/torch_llama.py's decoder (fused q/k/v and gate/up matrices, a preallocated KV
                cache, causal SDPA with grouped-query heads), last-position logits only.

Restore: for each N, a session's KV cache as Driftwood's session snapshot stores it (safetensors, tensors
layers.{i}.k and layers.{i}.v of shape (N, kv_heads, head_dim), bf16) written to a temporary file and read
once so it sits in the page cache, then safetensors.torch.load_file(path, device="cuda") timed with a host
clock around the call and a torch.cuda.synchronize(), median of --repeats.

JSON: {device, torch, transformers, model, repeats, prefill: [{tokens, transformers_ms, static_ms}],
restore: [{tokens, kv_bytes, safetensors_load_cuda_ms}]}.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_llama  # noqa: E402


def timed(fn, repeats):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", default="24,128,1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lengths = [int(x) for x in args.tokens.split(",")]
    dev = torch.device("cuda")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(dev).eval()
    cfg = torch_llama.load_config(args.model)
    static = torch_llama.Llama.from_dir(args.model, dev, torch.bfloat16, max_len=max(lengths) + 16)
    kc, vc = static.new_cache(1)
    vocab = cfg["vocab_size"]
    gen = torch.Generator().manual_seed(1234)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": os.path.basename(os.path.normpath(args.model)),
        "repeats": args.repeats,
        "prefill": [],
        "restore": [],
    }
    with torch.inference_mode():
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n), generator=gen).to(dev)
            pos = torch.arange(n, device=dev)
            t_hf = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), args.repeats)
            t_static = timed(lambda: static.forward(ids, pos, kc, vc, decode=False), args.repeats)
            result["prefill"].append({"tokens": n, "transformers_ms": t_hf, "static_ms": t_static})
            print(f"prefill {n}: transformers {t_hf:.2f} ms, static {t_static:.2f} ms", flush=True)

    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    with tempfile.TemporaryDirectory() as d:
        for n in lengths:
            tensors = {}
            for i in range(layers):
                for kv in "kv":
                    tensors[f"layers.{i}.{kv}"] = torch.randn(n, kv_heads, head_dim).bfloat16()
            path = os.path.join(d, f"kv-{n}.safetensors")
            save_file(tensors, path)
            with open(path, "rb") as f:  # into the page cache
                while f.read(1 << 24):
                    pass
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                load_file(path, device="cuda")
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            kv_bytes = sum(t.numel() * 2 for t in tensors.values())
            ms = statistics.median(times[1:])
            result["restore"].append({"tokens": n, "kv_bytes": kv_bytes, "safetensors_load_cuda_ms": ms})
            print(f"safetensors load_file(device=cuda) {n} tokens ({kv_bytes / 1e6:.1f} MB): {ms:.2f} ms", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
