#!/usr/bin/env python3
"""Decode-speed peer of `driftwood bench decode`: llama.cpp through llama-cpp-python, CPU only.

    python bench/peers/llama_cpp_decode.py --gguf MODEL.gguf --context 128,1024 [--steps 64] [--warmup 8]

For each context N: a fresh llama.cpp context (n_ctx = N + warmup + steps, n_batch 512) evaluates
the N context tokens (the same token ids as the candle peer, see prompt_token), then batch-1
greedy decode steps (Llama.eval of one token, argmax over its logits) are timed. Prints one JSON
object per context on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def prompt_token(i: int, vocab: int) -> int:
    """Deterministic pseudo-random context token i (same formula as the candle peer)."""
    return 17 + (i * 7919 + 104729) % (vocab - 17)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ggml_version() -> str:
    """ggml's version and commit, from the bundled library (llama-cpp-python does not bind them)."""
    import ctypes

    import llama_cpp

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        out = []
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            out.append(fn().decode())
        return f"ggml {out[0]} ({out[1]})"
    except (OSError, AttributeError):
        return "ggml unknown"


def gguf_dtype(path: str) -> str:
    import gguf

    r = gguf.GGUFReader(path)
    for t in r.tensors:
        if t.name == "token_embd.weight":
            return {"F32": "f32", "BF16": "bf16", "F16": "f16"}.get(t.tensor_type.name, t.tensor_type.name.lower())
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--context", default="128,1024")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, default=usable_cores())
    ap.add_argument("--flash-attn", action="store_true",
                    help="enable llama.cpp's flash attention (llama-cpp-python's default is off)")
    ap.add_argument("--kv-type", choices=["default", "f16", "f32", "bf16"], default="default",
                    help="KV cache element type (default: llama.cpp's, f16)")
    args = ap.parse_args()

    import llama_cpp

    dtype = gguf_dtype(args.gguf)
    extra = {}
    if args.kv_type != "default":
        t = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32, "bf16": llama_cpp.GGML_TYPE_BF16}[args.kv_type]
        extra = {"type_k": t, "type_v": t}

    ggml = ggml_version()
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    for n in [int(c) for c in args.context.split(",")]:
        n_ctx = n + args.warmup + args.steps
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=args.gguf,
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_gpu_layers=0,
            logits_all=False,
            flash_attn=args.flash_attn,
            verbose=False,
            **extra,
        )
        load_s = time.perf_counter() - t0
        vocab = llm.n_vocab()
        prompt = [prompt_token(i, vocab) for i in range(n)]

        t = time.perf_counter()
        def greedy() -> int:
            # Llama.eval keeps no logits unless logits_all; read the last output's row from llama.cpp.
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(vocab,))))

        llm.eval(prompt)
        first_token = greedy()
        prefill_s = time.perf_counter() - t

        nxt = first_token
        for _ in range(args.warmup):
            llm.eval([nxt])
            nxt = greedy()
        t = time.perf_counter()
        for _ in range(args.steps):
            llm.eval([nxt])
            nxt = greedy()
        decode_s = time.perf_counter() - t

        print(json.dumps({
            "peer": "llama.cpp",
            "version": f"llama-cpp-python {llama_cpp.__version__}, bundled llama.cpp with {ggml} (CPU, GGML_NATIVE=ON)",
            "dtype": dtype,
            "context": n,
            "decode_tokens_per_s": args.steps / decode_s,
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "first_token": first_token,
            "prefill_s": prefill_s,
            "load_s": load_s,
            "kv_type": args.kv_type if args.kv_type != "default" else "f16",
            "flash_attn": args.flash_attn,
            "system_info": system_info,
        }), flush=True)
        if hasattr(llm, "close"):
            llm.close()
        del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
