#!/usr/bin/env python3
"""PyTorch peers of the CUDA decode benchmark at batch 1: transformers eager and a CUDA-graph decoder.

    python3 bench/peers/torch_decode.py --model DIR --prompt-tokens 128 --gen-tokens 256 --out FILE.json
        [--skip-eager] [--no-compile] [--no-f32-check] [--decode-attn flash|sdpa] [--seed 1234] [--repeats 3]
    python3 bench/peers/torch_decode.py --model DIR --golden FILE.json [--golden-prompt-tokens 16]
        [--golden-gen-tokens 16]

Both can be given in one run. The model is loaded in bf16 on CUDA (on CPU when there is no CUDA,
for checking the script on a small model: times then come from time.perf_counter and no CUDA
graph is captured).

Benchmark (--out): one prompt of --prompt-tokens token ids drawn from the whole vocabulary with
torch.Generator().manual_seed(--seed), then greedy decoding of --gen-tokens tokens, measured
two ways:

  eager         transformers' LlamaForCausalLM as loaded (its default attention implementation,
                default dynamic KV cache). decode_ms_per_token: a manual loop (model(token,
                past_key_values=cache), argmax on the device, no host sync inside the loop), one
                CUDA event per step, median over the decode steps of --repeats loops after a
                warm-up loop. prefill_ms: the loop's prompt forward pass (median). Also
                model.generate (do_sample=False, min_new_tokens = max_new_tokens) timed with 1 and
                with gen+1 new tokens: generate_prefill_ms = time(1) and
                generate_decode_ms_per_token = (time(gen+1) - time(1)) / gen, medians of --repeats.
  static_graph  torch_llama.py's decoder on the same weights (fused q/k/v and gate/up matrices,
                preallocated KV cache of prompt + gen + 8 positions rounded up to a multiple
                of 16, decode attention by varlen FlashAttention over the used cache rows, or
                with --decode-attn sdpa over the whole cache with a mask). The single-token
                decode step (embedding, layers, output projection, argmax fed back as the next
                input, position + 1) is captured once in a torch.cuda.CUDAGraph and replayed
                once per token. Two variants: the step as plain PyTorch ops, and the step
                compiled with torch.compile (Inductor, default mode, fixed shapes) and then
                captured the same way (skipped with --no-compile; a compilation error is
                recorded, not fatal). Per-step CUDA events between replays, median over gen
                steps x --repeats; the headline is the faster variant. prefill_ms: its prompt
                forward pass (plain ops, no graph, median of --repeats).

Checks (with eager; bf16 greedy decoding of a random model meets many near-ties, so two correct
implementations with different kernels part ways after some tokens):
  tokens_match                 common prefix of the gen+1 greedy tokens (the first comes from
                               the prefill) of the headline variant and model.generate;
  variants.*.teacher_forced_agree[_f32]
                               the variant fed generate's tokens instead of its own: its argmax
                               agrees with generate's next token / with the float32 reference
                               at how many of the gen (gen+1) positions;
  variants.*.prompt_teacher_forced_agree[_f32]
                               the variant decodes the prompt one token at a time from position
                               0: argmax agreement with transformers' bf16 / float32 logits of
                               the whole prompt;
  checks.generate_agree_f32    the same for generate's own tokens against float32;
  checks.prompt_logits         mean/max |difference| and argmax agreement over the prompt
                               positions of the decode path's logits (plain ops), transformers'
                               bf16 logits and the float32 reference.
The float32 reference is transformers with the bf16 weights widened to float32, run over the
prompt followed by generate's tokens (--no-f32-check skips it).

JSON written to --out: {device, torch, transformers, dtype, model, prompt_tokens, gen_tokens,
seed, repeats, timing, eager: {prefill_ms, decode_ms_per_token, decode_ms_per_token_mean,
generate_prefill_ms, generate_decode_ms_per_token, attn_implementation,
loop_tokens_match_generate}, static_graph: {prefill_ms, decode_ms_per_token,
decode_ms_per_token_mean, tokens_per_s, variant, graph, kv_cache_positions, decode_attn,
variants: {plain, compiled}}, tokens_match, tokens_compared, greedy_tokens (the first 32 of
generate's, else of the static decoder's), checks, max_memory_allocated_bytes}.

Memory on CUDA (Llama-3.2-1B shape): about 8 GB (the bf16 model, the fused copies, the float32
model for the reference check). Runtime: about 2 minutes, most of it the eager loops and
generate calls and the compilation (about 20 s).

Golden (--golden FILE.json): for the fixed prompt token i = 17 + (i * 7919 + 104729) % (vocab -
17), i < --golden-prompt-tokens, transformers' float32 logits of the last prompt position: top-64
indices and values, the logsumexp over the whole vocabulary, the whole logits vector saved as
float32 .npy next to FILE.json (FILE.logits.npy), and the greedy continuation of
--golden-gen-tokens tokens (generate, do_sample=False). Done twice: with the model in bf16 (the
logits cast to float32) and with the bf16 weights widened to float32 (float32 compute), under
"bf16" and "f32" (the .npy files FILE.bf16.logits.npy and FILE.f32.logits.npy). Also records
how far torch_llama.py's decoder is from transformers on that prompt in bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_llama import GraphDecoder, Llama, Timer, load_config, median  # noqa: E402


def prompt_token(i: int, vocab: int) -> int:
    """Deterministic pseudo-random prompt token i (the formula the other peers use)."""
    return 17 + (i * 7919 + 104729) % (vocab - 17)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def load_hf(model_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def greedy_generate(model, ids: torch.Tensor, n: int, eos: int | None) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=1,
        min_new_tokens=n,
        max_new_tokens=n,
        pad_token_id=eos,
    )


# ----------------------------------------------------------------------------- eager


@torch.inference_mode()
def run_eager(model, prompt: torch.Tensor, gen: int, repeats: int, device: torch.device, eos: int | None) -> tuple[dict, list[int], torch.Tensor]:
    P = prompt.shape[1]

    def loop(timer: Timer | None) -> list[int]:
        if timer:
            timer.mark()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        if timer:
            timer.mark()
        toks = [tok]
        for _ in range(gen):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
            if timer:
                timer.mark()
        return torch.cat(toks, 1)[0].tolist()

    prompt_logits = model(input_ids=prompt).logits[0].float()
    loop(None)  # warm-up
    prefill, steps = [], []
    for _ in range(repeats):
        t = Timer(device)
        loop_tokens = loop(t)
        iv = t.intervals_ms()
        prefill.append(iv[0])
        steps += iv[1:]

    greedy_generate(model, prompt, 8, eos)  # warm-up
    gen_ms: dict[int, list[float]] = {1: [], gen + 1: []}
    gen_tokens: list[int] = []
    for _ in range(repeats):
        for n in (1, gen + 1):
            t = Timer(device)
            t.mark()
            out = greedy_generate(model, prompt, n, eos)
            t.mark()
            gen_ms[n].append(t.intervals_ms()[0])
            if n == gen + 1:
                gen_tokens = out[0, P:].tolist()
    g1, gn = median(gen_ms[1]), median(gen_ms[gen + 1])
    res = {
        "prefill_ms": median(prefill),
        "decode_ms_per_token": median(steps),
        "decode_ms_per_token_mean": sum(steps) / len(steps),
        "generate_prefill_ms": g1,
        "generate_decode_ms_per_token": (gn - g1) / gen,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "loop_tokens_match_generate": common_prefix(loop_tokens, gen_tokens),
    }
    return res, gen_tokens, prompt_logits


# ----------------------------------------------------------------------------- static graph


@torch.inference_mode()
def run_static(
    llama: Llama,
    prompt: torch.Tensor,
    gen: int,
    repeats: int,
    device: torch.device,
    compile_too: bool,
    ref: dict | None,
) -> tuple[dict, list[int], dict | None]:
    """Times the variants; with `ref` (see reference_checks) also checks them against it."""
    P = prompt.shape[1]
    kc, vc = llama.new_cache(1)
    pos = torch.arange(P, device=device)

    llama.forward(prompt, pos, kc, vc, decode=False)  # warm-up
    prefill = []
    for _ in range(repeats):
        t = Timer(device)
        t.mark()
        logits = llama.forward(prompt, pos, kc, vc, decode=False)
        t.mark()
        prefill.append(t.intervals_ms()[0])
    tok0 = logits.argmax(-1)

    use_graph = device.type == "cuda"
    variants: dict = {}
    tokens: dict = {}
    kinds = ["plain"] + (["compiled"] if compile_too else [])
    for kind in kinds:
        llama.forward(prompt, pos, kc, vc, decode=False)  # the prompt's cache rows, as prefill wrote them
        try:
            dec = GraphDecoder(llama, kc, vc, 1, use_graph=use_graph, compile=(kind == "compiled"))
            dec.set(tok0, P)
            dec.prepare()
        except Exception as e:  # compilation can fail where Triton or a compiler is missing
            variants[kind] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        # Greedy tokens (untimed).
        dec.set(tok0, P)
        hist = [tok0.clone()]
        for _ in range(gen):
            dec.step()
            hist.append(dec.tok.clone())
        toks = torch.cat(hist).tolist()
        tokens[kind] = toks
        # Timed runs.
        steps = []
        for _ in range(repeats):
            dec.set(tok0, P)
            t = Timer(device)
            t.mark()
            for _ in range(gen):
                dec.step()
                t.mark()
            steps += t.intervals_ms()
        v = {
            "decode_ms_per_token": median(steps),
            "decode_ms_per_token_mean": sum(steps) / len(steps),
            "graph": dec.graph is not None,
        }
        if ref is not None:
            v.update(teacher_forced(dec, tok0, prompt, ref))
            v["tokens_match"] = common_prefix(toks, ref["gen_tokens"])
        variants[kind] = v
    ok = [k for k in kinds if "decode_ms_per_token" in variants[k]]
    if not ok:
        raise SystemExit(f"no static decoder variant ran: {variants}")
    best = min(ok, key=lambda k: variants[k]["decode_ms_per_token"])
    res = {
        "prefill_ms": median(prefill),
        "decode_ms_per_token": variants[best]["decode_ms_per_token"],
        "decode_ms_per_token_mean": variants[best]["decode_ms_per_token_mean"],
        "tokens_per_s": 1e3 / variants[best]["decode_ms_per_token"],
        "variant": best,
        "graph": variants[best]["graph"],
        "kv_cache_positions": llama.max_len,
        "decode_attn": llama.decode_attn,
        "variants": variants,
    }
    checks = None
    if ref is not None:
        # The decode path's logits (plain ops, no graph) at every prompt position, fed the prompt.
        rows = []
        for i in range(P):
            rows.append(llama.forward(prompt[:, i : i + 1], pos[i : i + 1], kc, vc, decode=True)[0].float())
        mine = torch.stack(rows)
        checks = {
            "static_decode_path_vs_f32": compare(mine, ref["prompt_logits_f32"]),
            "static_decode_path_vs_transformers_bf16": compare(mine, ref["prompt_logits_bf16"]),
            "transformers_bf16_vs_f32": compare(ref["prompt_logits_bf16"], ref["prompt_logits_f32"]),
        }
    return res, tokens[best], checks


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Logit rows a vs b (positions x vocab): mean and max |a - b| and argmax agreement."""
    d = (a - b).abs()
    return {
        "mean_abs_diff": float(d.mean()),
        "max_abs_diff": float(d.max()),
        "argmax_agree": int((a.argmax(-1) == b.argmax(-1)).sum()),
        "positions": a.shape[0],
    }


def teacher_forced(dec: GraphDecoder, tok0: torch.Tensor, prompt: torch.Tensor, ref: dict) -> dict:
    """Argmax agreement of the decoder when it is fed the reference tokens instead of its own.

    Over generate's tokens (from position P): against generate's next token and against the
    float32 argmax. Over the prompt (decode steps from position 0): against transformers' bf16
    and float32 argmax of the whole prompt. Rewrites the cache rows of the prompt.
    """
    P = prompt.shape[1]
    gen_tokens = ref["gen_tokens"]
    G = len(gen_tokens) - 1
    f32 = ref["f32_argmax"]
    g = torch.tensor(gen_tokens, device=dec.tok.device)
    preds = [int(tok0)]
    dec.set(g[0], P)
    for i in range(G):
        dec.step()
        preds.append(int(dec.tok.item()))
        dec.tok.copy_(g[i + 1 : i + 2])
    out = {
        "teacher_forced_agree": sum(int(preds[i] == gen_tokens[i]) for i in range(1, G + 1)),
        "teacher_forced_agree_f32": sum(int(preds[i] == f32[P - 1 + i]) for i in range(G + 1)),
    }
    bf16_prompt = ref["prompt_logits_bf16"].argmax(-1).tolist()
    dec.set(prompt[0, 0], 0)
    preds = []
    for i in range(P):
        dec.step()
        preds.append(int(dec.tok.item()))
        if i + 1 < P:
            dec.tok.copy_(prompt[0, i + 1 : i + 2])
    out["prompt_teacher_forced_agree"] = sum(int(a == b) for a, b in zip(preds, bf16_prompt))
    out["prompt_teacher_forced_agree_f32"] = sum(int(a == b) for a, b in zip(preds, f32[:P]))
    return out


@torch.inference_mode()
def reference_checks(model_dir: str, prompt: torch.Tensor, gen_tokens: list[int], prompt_logits_bf16: torch.Tensor, device: torch.device) -> dict:
    """transformers in float32 (the bf16 weights widened) over the prompt and generate's tokens."""
    P = prompt.shape[1]
    f32 = load_hf(model_dir, device, torch.float32)
    seq = torch.cat([prompt, torch.tensor([gen_tokens[:-1]], device=device)], 1)
    logits = f32(input_ids=seq).logits[0].float()
    del f32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    f32_argmax = logits.argmax(-1).tolist()
    return {
        "gen_tokens": gen_tokens,
        "f32_argmax": f32_argmax,
        "prompt_logits_f32": logits[:P].clone(),
        "prompt_logits_bf16": prompt_logits_bf16,
        "generate_agree_f32": sum(int(gen_tokens[i] == f32_argmax[P - 1 + i]) for i in range(len(gen_tokens))),
    }


# ----------------------------------------------------------------------------- golden


@torch.inference_mode()
def golden(model_dir: str, path: Path, n_prompt: int, n_gen: int, device: torch.device, hf_bf16) -> dict:
    cfg = load_config(model_dir)
    V = cfg["vocab_size"]
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    ids = [prompt_token(i, V) for i in range(n_prompt)]
    x = torch.tensor([ids], device=device)
    doc: dict = {
        "model": Path(model_dir).name,
        "prompt": ids,
        "prompt_formula": "17 + (i * 7919 + 104729) % (vocab - 17)",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    import transformers

    doc["transformers"] = transformers.__version__
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        model = hf_bf16 if (dtype == torch.bfloat16 and hf_bf16 is not None) else load_hf(model_dir, device, dtype)
        logits = model(input_ids=x).logits[0, -1].float()
        top = torch.topk(logits, 64)
        npy = path.with_name(f"{stem}.{name}.logits.npy")
        np.save(npy, logits.cpu().numpy().astype(np.float32))
        cont = greedy_generate(model, x, n_gen, eos)[0, n_prompt:].tolist()
        doc[name] = {
            "compute_dtype": str(dtype).replace("torch.", ""),
            "top64_indices": top.indices.tolist(),
            "top64_values": top.values.tolist(),
            "logsumexp": float(torch.logsumexp(logits, 0)),
            "argmax": int(logits.argmax()),
            "logits_npy": npy.name,
            "greedy_continuation": cont,
        }
        if dtype == torch.bfloat16:
            # How close torch_llama.py's decoder is to transformers on this prompt (bf16).
            llama = Llama({**cfg}, dict(model.state_dict()), device, torch.bfloat16, n_prompt + 1)
            kc, vc = llama.new_cache(1)
            mine = llama.forward(x, torch.arange(n_prompt, device=device), kc, vc, decode=False)[0].float()
            doc["torch_llama_vs_transformers_bf16"] = {
                "max_abs_logit_diff": float((mine - logits).abs().max()),
                "argmax_equal": bool(int(mine.argmax()) == int(logits.argmax())),
            }
            del llama, kc, vc
        if model is not hf_bf16:
            del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model dir (config.json, model.safetensors)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, help="benchmark JSON to write")
    ap.add_argument("--skip-eager", action="store_true", help="only the static-cache CUDA-graph decoder")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--decode-attn", choices=["flash", "sdpa"], help="decode attention (default flash on CUDA, sdpa on CPU)")
    ap.add_argument("--no-f32-check", action="store_true", help="skip the float32 reference checks")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the prompt's token ids")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--golden", type=Path, help="reference logits JSON to write")
    ap.add_argument("--golden-prompt-tokens", type=int, default=16)
    ap.add_argument("--golden-gen-tokens", type=int, default=16)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = ap.parse_args()
    if not args.out and not args.golden:
        ap.error("nothing to do: give --out and/or --golden")

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    dtype = torch.bfloat16
    cfg = load_config(args.model)
    V = cfg["vocab_size"]
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    import transformers

    hf = None
    if args.golden or (args.out and not args.skip_eager):
        hf = load_hf(args.model, device, dtype)

    if args.golden:
        doc = golden(args.model, args.golden, args.golden_prompt_tokens, args.golden_gen_tokens, device, hf)
        print(f"golden: {args.golden} (argmax bf16 {doc['bf16']['argmax']}, f32 {doc['f32']['argmax']}; "
              f"torch_llama vs transformers: {doc['torch_llama_vs_transformers_bf16']})", flush=True)

    if not args.out:
        return 0

    P, G = args.prompt_tokens, args.gen_tokens
    prompt = torch.randint(0, V, (1, P), generator=torch.Generator().manual_seed(args.seed)).to(device)
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "bfloat16",
        "model": Path(args.model).name,
        "prompt_tokens": P,
        "gen_tokens": G,
        "seed": args.seed,
        "repeats": args.repeats,
        "timing": "cuda events" if device.type == "cuda" else "perf_counter",
    }

    ref = None
    if hf is not None and not args.skip_eager:
        result["eager"], reference, prompt_logits = run_eager(hf, prompt, G, args.repeats, device, eos)
        print(f"eager: {result['eager']}", flush=True)
        weights = dict(hf.state_dict())
        if not args.no_f32_check:
            ref = reference_checks(args.model, prompt, reference, prompt_logits, device)
    else:
        reference = None
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(Path(args.model).glob("*.safetensors")):
            weights.update(load_file(str(f), device=str(device)))
    llama = Llama(cfg, weights, device, dtype, P + G + 8)
    if args.decode_attn:
        llama.decode_attn = args.decode_attn
    del weights
    compile_too = device.type == "cuda" and not args.no_compile
    result["static_graph"], static_tokens, prompt_checks = run_static(
        llama, prompt, G, args.repeats, device, compile_too, ref
    )
    print(f"static_graph: {result['static_graph']}", flush=True)

    if reference is not None:
        result["tokens_match"] = common_prefix(static_tokens, reference)
        result["tokens_compared"] = len(reference)
        result["greedy_tokens"] = reference[:32]
    else:
        result["tokens_match"] = None
        result["greedy_tokens"] = static_tokens[:32]
    if ref is not None:
        result["checks"] = {
            "reference": "transformers, bf16 weights widened to float32, over the prompt + generate's tokens",
            "generate_agree_f32": ref["generate_agree_f32"],
            "generate_positions": len(reference),
            "prompt_logits": prompt_checks,
        }
        print(f"checks: {result['checks']}", flush=True)
    if device.type == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: eager {result.get('eager', {}).get('decode_ms_per_token')} ms/token, "
          f"static graph {result['static_graph']['decode_ms_per_token']:.4f} ms/token "
          f"({result['static_graph']['variant']}), tokens_match {result['tokens_match']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
