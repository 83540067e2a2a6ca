#!/usr/bin/env python3
"""Write a Llama-3.2-1B-shaped LlamaForCausalLM with random weights as a Hugging Face model dir.

    python3 bench/peers/make_llama1b.py --out DIR [--seed N] [--dtype bf16|f32] [--device auto|cuda|cpu]

Shape: hidden 2048, 16 layers, 32 attention heads, 8 KV heads (head_dim 64), intermediate 8192,
vocab 128256, tied embeddings (no lm_head.weight in the file), rms_norm_eps 1e-5, rope_theta
500000 with llama3 rope scaling (factor 32, low_freq_factor 1, high_freq_factor 4,
original_max_position_embeddings 8192), max_position_embeddings 131072: 1.236 G parameters,
2.47 GB in bf16.

The directory holds config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json. Every matrix is drawn from a seeded normal distribution (std 0.02) with
torch, tensor by tensor in a fixed order (embedding, then per layer q, k, v, o, gate, up, down),
and rounded to bf16 (round to nearest even); every RMSNorm weight is 1. Tensors are written in
that order (not sorted by name). The numbers depend on the seed, on the generator's device
(torch's CUDA and CPU generators give different numbers; `--device cpu` gives the same numbers on
any machine with the same torch version) and on the torch version; the device used is recorded in
the file's metadata.

The tokenizer is make_model.py's: a byte-level BPE trained on the running Python's standard
library sources, padded with filler tokens, here to exactly 128256 entries. Ids 0-16 are
SmolLM2's special tokens; bos = 1 (<|im_start|>), eos = 2 (<|im_end|>). Benchmarks feed token
ids, so its quality does not matter.

Prints the parameter count and the size of model.safetensors. Needs torch, safetensors,
tokenizers and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model  # noqa: E402  (the shared tensor list, writer and tokenizer builder)

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
}

# A small model with the same structure and vocabulary, for checking scripts without a GPU.
TINY = dict(
    SHAPE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

BOS_ID = make_model.BOS_ID
EOS_ID = make_model.EOS_ID
DEFAULT_SEED = 20250321


def config_json(cfg: dict, dtype: str) -> dict:
    """make_model's Llama config, with this shape's llama3 RoPE scaling."""
    doc = make_model.config_json(cfg, dtype)
    doc["rope_scaling"] = dict(cfg["rope_scaling"])
    return doc


def generation_config_json() -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "do_sample": False}


def write_weights(path: Path, cfg: dict, dtype: str, seed: int, std: float, device: str) -> int:
    """Generate the tensors in make_model.tensor_specs order with torch and stream them into a safetensors
    file (make_model.write_safetensors)."""
    tdtype = torch.float32 if dtype == "f32" else torch.bfloat16
    meta = {"format": "pt", "generator": f"torch {torch.__version__} {device} seed {seed} std {std}"}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def tensor_bytes(shape: tuple[int, ...], kind: str) -> memoryview:
        if kind == "ones":
            w = torch.ones(shape, dtype=tdtype)
        else:
            w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            w.mul_(std)
            w = w.to(tdtype).cpu()
        # Raw little-endian bytes (numpy has no bfloat16: view the bits as int16).
        raw = w.contiguous().view(torch.int16 if dtype == "bf16" else torch.int32).numpy()
        if sys.byteorder != "little":
            raw = raw.byteswap()
        return memoryview(raw).cast("B")

    return make_model.write_safetensors(path, make_model.tensor_specs(cfg), dtype, meta, tensor_bytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output dir")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where the generator runs")
    ap.add_argument("--tokenizer-from", type=Path, help="copy tokenizer.json from this file instead of training one")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(TINY if args.tiny else SHAPE)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.tokenizer_from:
        tok_text = args.tokenizer_from.read_text(encoding="utf-8")
    else:
        tok_text = make_model.build_tokenizer(cfg["vocab_size"])
    t_tok = time.perf_counter() - t0
    (out / "tokenizer.json").write_text(tok_text, encoding="utf-8")
    tok_cfg = make_model.tokenizer_config_json(cfg)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_json(cfg, args.dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config_json(), indent=2) + "\n")

    t1 = time.perf_counter()
    n = write_weights(out / "model.safetensors", cfg, args.dtype, args.seed, args.std, device)
    t_w = time.perf_counter() - t1
    size = (out / "model.safetensors").stat().st_size
    print(
        f"wrote {out}: {n} parameters ({n / 1e9:.3f} G), model.safetensors {size} bytes ({size / 1e9:.2f} GB), "
        f"{args.dtype}, seed {args.seed}, generator on {device}; tokenizer {t_tok:.1f} s, weights {t_w:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
