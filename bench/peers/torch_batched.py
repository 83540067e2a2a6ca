#!/usr/bin/env python3
"""PyTorch peer of the CUDA batched-decode benchmark: batched greedy decode steps in a CUDA graph.

    python3 bench/peers/torch_batched.py --model DIR --batch 64 --context 1024 --steps 32 --out FILE.json
        [--warmup 4] [--repeats 3] [--prefill-chunk 8] [--no-compile] [--decode-attn flash|sdpa] [--seed 1234]

--batch takes a comma-separated list (e.g. 1,16,64): each batch size is measured in turn with
its own cache and graphs.

The model (bf16, weights read from the safetensors files) runs in torch_llama.py's decoder:
fused q/k/v and gate/up matrices, a preallocated KV cache of context + warmup + steps positions
(rounded up to a multiple of 16) per sequence, decode attention by varlen FlashAttention over
the used cache rows (--decode-attn sdpa: scaled_dot_product_attention over the whole cache with
a mask). Each of the `batch` sequences gets its own `context` random token ids
(torch.Generator().manual_seed(seed)), and the cache is filled by a real batched prefill of
those tokens (causal attention, --prefill-chunk sequences per forward pass; run twice, the
second timed as prefill_ms), so every sequence holds real K/V values of a context-token history
and all sequences sit at the same position. Then the batched single-token decode step
(embedding, layers, attention over the cache up to the current position, output projection,
argmax fed back as each sequence's next token, position + 1) is captured in a
torch.cuda.CUDAGraph and replayed: --warmup untimed replays, then --steps timed replays with a
CUDA event between replays, --repeats times from the same starting state. As in
torch_decode.py there are two variants, plain PyTorch ops and the step compiled with
torch.compile (Inductor, default mode, fixed shapes) before capture; the faster one is the
headline. tokens_per_s = batch / median step time (tokens_per_s_mean: from the mean step time).

On a machine without CUDA it runs on the CPU with no graph and time.perf_counter, for checking
the script on a small model.

Memory at batch 64, context 1024, Llama-3.2-1B shape: weights 2.5 GB (the fused matrices are
copies, the originals are freed), KV cache 64 x 1072 positions x 32 KiB = 2.2 GB, prefill
activations of 8 x 1024 tokens about 1 GB: a peak of about 6 GB allocated. Runtime: under a
minute per batch size, most of it the compilation.

JSON written to --out: {device, torch, context, steps, warmup, results: [{batch, prefill_ms,
decode_ms_per_step, decode_ms_per_step_mean, tokens_per_s, tokens_per_s_mean, variant, variants,
kv_cache_bytes, max_memory_allocated_bytes}], kv_fill: "batched prefill of random tokens"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_llama import GraphDecoder, Llama, Timer, median  # noqa: E402


@torch.inference_mode()
def run_batch(llama: Llama, B: int, C: int, steps: int, warmup: int, repeats: int, chunk: int, seed: int, compile_too: bool) -> dict:
    device = llama.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    kc, vc = llama.new_cache(B)
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, llama.vocab, (B, C), generator=gen).to(device)
    pos = torch.arange(C, device=device)

    def prefill() -> torch.Tensor:
        last = []
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            logits = llama.forward(ctx[b0:b1], pos, [k[b0:b1] for k in kc], [v[b0:b1] for v in vc], decode=False)
            last.append(logits.argmax(-1))
        return torch.cat(last)

    prefill()  # warm-up (the same rows are written again)
    t = Timer(device)
    t.mark()
    tok0 = prefill()
    t.mark()
    prefill_ms = t.intervals_ms()[0]

    use_graph = device.type == "cuda"
    variants: dict = {}
    kinds = ["plain"] + (["compiled"] if compile_too else [])
    first_tokens = {}
    for kind in kinds:
        try:
            dec = GraphDecoder(llama, kc, vc, B, use_graph=use_graph, compile=(kind == "compiled"))
            dec.set(tok0, C)
            dec.prepare()
        except Exception as e:
            variants[kind] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        samples = []
        for _ in range(repeats):
            dec.set(tok0, C)
            for _ in range(warmup):
                dec.step()
            t = Timer(device)
            t.mark()
            for _ in range(steps):
                dec.step()
                t.mark()
            samples += t.intervals_ms()
        # The tokens after one step from the prefill state, for comparing the variants.
        dec.set(tok0, C)
        dec.step()
        first_tokens[kind] = dec.tok.clone()
        med = median(samples)
        mean = sum(samples) / len(samples)
        variants[kind] = {
            "decode_ms_per_step": med,
            "decode_ms_per_step_mean": mean,
            "tokens_per_s": B * 1e3 / med,
            "tokens_per_s_mean": B * 1e3 / mean,
            "graph": dec.graph is not None,
        }
        del dec
    ok = [k for k in kinds if "decode_ms_per_step" in variants[k]]
    if not ok:
        raise SystemExit(f"no decoder variant ran at batch {B}: {variants}")
    best = min(ok, key=lambda k: variants[k]["decode_ms_per_step"])
    res = {
        "batch": B,
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": B * C * 1e3 / prefill_ms,
        **{k: variants[best][k] for k in ("decode_ms_per_step", "decode_ms_per_step_mean", "tokens_per_s", "tokens_per_s_mean", "graph")},
        "variant": best,
        "variants": variants,
        "kv_cache_positions": llama.max_len,
        "kv_cache_bytes": sum(x.numel() * x.element_size() for x in kc + vc),
    }
    if len(first_tokens) == 2:
        res["variants_agree_first_step"] = int((first_tokens["plain"] == first_tokens["compiled"]).sum())
    if device.type == "cuda":
        res["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model dir (config.json, model.safetensors)")
    ap.add_argument("--batch", default="64", help="batch size, or a comma-separated list")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=8, help="sequences per prefill forward pass")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--decode-attn", choices=["flash", "sdpa"], help="decode attention (default flash on CUDA, sdpa on CPU)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = ap.parse_args()

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    C = args.context
    llama = Llama.from_dir(args.model, device, torch.bfloat16, C + args.warmup + args.steps)
    if args.decode_attn:
        llama.decode_attn = args.decode_attn
    compile_too = device.type == "cuda" and not args.no_compile
    out: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "model": Path(args.model).name,
        "parameters": llama.param_count(),
        "context": C,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "kv_fill": "batched prefill of random tokens",
        "decode_attn": llama.decode_attn,
        "timing": "cuda events" if device.type == "cuda" else "perf_counter",
        "results": [],
    }
    for B in batches:
        r = run_batch(llama, B, C, args.steps, args.warmup, args.repeats, args.prefill_chunk, args.seed, compile_too)
        out["results"].append(r)
        print(f"batch {B}: {r['tokens_per_s']:.1f} tokens/s ({r['decode_ms_per_step']:.3f} ms/step, {r['variant']}); "
              f"variants {json.dumps(r['variants'])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
