#!/usr/bin/env python3
"""Train the bundled driftwood-mini model (a tiny Llama) from prepared token data.

Input (written by scripts/train/prepare_data.py):
    <data-dir>/train.bin, <data-dir>/val.bin   uint16 token ids
    <data-dir>/tokenizer/                      tokenizer.json + configs
Output (<out>): a Hugging Face model folder (config.json, generation_config.json,
model.safetensors, tokenizer files unless --no-tokenizer) plus train_log.json
and samples.txt.

Training: bf16 autocast, AdamW, linear warmup + cosine decay. The schedule
follows max(step / max_steps, elapsed / time_budget), so the run always
finishes its schedule within --time-budget seconds. The weights with the best
validation loss are the ones saved.

Needs: torch, transformers (>= 4.40), safetensors, tokenizers, numpy.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

PROMPTS = [
    "Once upon a time",
    "The king said",
    "It is a truth universally acknowledged",
    "In the morning, Elizabeth",
    "And God said",
    "She walked into the room and",
]
CHAT_PROMPTS = [
    "Continue this passage:\n\nThe young lady had never seen so fine a house.",
    "Please continue the story:\n\nAnd the king called his servants unto him.",
    "Hello! Who are you?",
]


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds of training")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="training-only dropout on embeddings and on each attention/MLP output")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="saved weight dtype")
    ap.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer files to out")
    ap.add_argument("--sample-tokens", type=int, default=60)
    return ap.parse_args()


def add_dropout_hooks(model: LlamaForCausalLM, p: float):
    """Residual dropout without changing the architecture or the saved config.

    Forward hooks drop out the token embeddings and the outputs of every
    attention and MLP block while module.training is True; in eval mode (and in
    the saved model, which carries no hooks) they do nothing.
    """
    drop = torch.nn.functional.dropout

    def hook(module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (drop(output[0], p, True),) + tuple(output[1:])
        return drop(output, p, True)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def main():
    args = parse_args()
    t_start = time.time()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    use_amp = dev == "cuda"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print("device:", torch.cuda.get_device_name(0), flush=True)
    print("torch", torch.__version__, "| python", sys.version.split()[0], flush=True)

    data_dir = Path(args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eot, im_start, im_end = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))

    train = torch.from_numpy(np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)).to(dev)
    val = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)).to(dev)
    print(f"train tokens {train.numel():,}  val tokens {val.numel():,}  vocab {vocab}", flush=True)
    assert int(train.max()) < vocab and int(val.max()) < vocab

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        use_cache=True,
    )
    model = LlamaForCausalLM(config).to(dev)
    if args.dropout > 0:
        add_dropout_hooks(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,} ({n_params/1e6:.2f}M, tied embeddings)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=(dev == "cuda"),
    )
    fwd = torch.compile(model) if args.compile else model

    T, B = args.seq_len, args.batch

    def batch(data: torch.Tensor, bs: int, gen: torch.Generator | None = None):
        ix = torch.randint(0, data.numel() - T - 1, (bs,), device=dev, generator=gen)
        offs = torch.arange(T + 1, device=dev)
        chunk = data[ix[:, None] + offs[None, :]]
        return chunk[:, :-1], chunk[:, 1:]

    def loss_of(m, x, y):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = m(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))

    val_gen = torch.Generator(device=dev)

    @torch.no_grad()
    def evaluate():
        model.eval()
        val_gen.manual_seed(0)
        losses = [loss_of(fwd, *batch(val, B, val_gen)).item() for _ in range(args.eval_batches)]
        model.train()
        return sum(losses) / len(losses)

    def lr_at(progress: float, step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, progress)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    log = {"args": vars(args), "params": n_params, "evals": [], "train": []}
    best = (float("inf"), -1, None)
    t0 = time.time()
    step = 0
    model.train()
    ema = None
    while True:
        elapsed = time.time() - t0
        progress = max(step / args.max_steps, elapsed / args.time_budget)
        if progress >= 1.0:
            break
        if step % args.eval_every == 0 and step > 0:
            vl = evaluate()
            log["evals"].append({"step": step, "val_loss": vl, "train_loss": ema, "time": elapsed})
            tag = ""
            if vl < best[0]:
                best = (vl, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                tag = " *"
            print(f"step {step:5d}  t {elapsed:6.1f}s  lr {lr:.2e}  train {ema:.4f}  val {vl:.4f}{tag}", flush=True)
        lr = lr_at(progress, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch(train, B)
        loss = loss_of(fwd, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step < 10:
            lv = loss.item()
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            if step % 50 == 0:
                log["train"].append({"step": step, "loss": lv})
    train_time = time.time() - t0
    vl = evaluate()
    log["evals"].append({"step": step, "val_loss": vl, "train_loss": ema, "time": train_time})
    print(f"final step {step}  train {ema:.4f}  val {vl:.4f}  ({train_time:.1f}s, "
          f"{step * B * T / train_time:,.0f} tok/s, {step * B * T / train.numel():.1f} epochs)", flush=True)
    if vl < best[0]:
        best = (vl, step, None)
    else:
        model.load_state_dict(best[2])
        print(f"restored best checkpoint: step {best[1]} val {best[0]:.4f}", flush=True)
    log.update(steps=step, train_time_s=train_time, final_train_loss_ema=ema,
               best_val_loss=best[0], best_step=best[1],
               tokens_seen=step * B * T, train_tokens=train.numel())

    # ---- save ----
    model.eval()
    save_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen_cfg = GenerationConfig(
        bos_token_id=eot, eos_token_id=[eot, im_start, im_end], pad_token_id=eot,
        do_sample=True, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1,
        max_new_tokens=256,
    )
    model.generation_config = gen_cfg
    model_to_save = copy.deepcopy(model).to(save_dtype)
    model_to_save.save_pretrained(out, safe_serialization=True)
    # Add the classic keys that older loaders (and non-Python runtimes) look for.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rp = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    cfg["torch_dtype"] = "bfloat16" if args.dtype == "bf16" else "float32"
    cfg.setdefault("dtype", cfg["torch_dtype"])
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if not args.no_tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(data_dir / "tokenizer" / f, out / f)
    print("saved:", sorted(p.name for p in out.iterdir()), flush=True)
    for p in sorted(out.iterdir()):
        print(f"  {p.name:28s} {p.stat().st_size:>12,d} bytes", flush=True)

    # ---- samples (from the saved-precision weights) ----
    gm = model_to_save.to(dev)
    samples = []

    @torch.no_grad()
    def generate(ids: list[int], n: int, greedy: bool, stop: set[int]) -> list[int]:
        x = torch.tensor([ids], device=dev)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95)
        outp = gm.generate(x, max_new_tokens=n, eos_token_id=list(stop), pad_token_id=eot,
                           repetition_penalty=1.0 if greedy else 1.1, **kw)
        return outp[0, len(ids):].tolist()

    torch.manual_seed(0)
    for p in PROMPTS:
        ids = [eot] + tok.encode(p).ids
        g = tok.decode(generate(ids, args.sample_tokens, True, {eot}))
        s = tok.decode(generate(ids, args.sample_tokens, False, {eot}))
        samples.append({"prompt": p, "greedy": g, "sampled": s})
        print(f"\n### {p!r}\n[greedy]  {p}{g}\n[sampled] {p}{s}", flush=True)
    for p in CHAT_PROMPTS:
        text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        ids = tok.encode(text).ids
        g = tok.decode(generate(ids, args.sample_tokens, True, {eot, im_end}))
        s = tok.decode(generate(ids, args.sample_tokens, False, {eot, im_end}))
        samples.append({"chat_user": p, "greedy": g, "sampled": s})
        print(f"\n### chat {p!r}\n[greedy]  {g}\n[sampled] {s}", flush=True)
    log["samples"] = samples
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"\ntotal wall time {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
