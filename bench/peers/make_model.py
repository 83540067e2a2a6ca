#!/usr/bin/env python3
"""Write a SmolLM2-135M-shaped LlamaForCausalLM with random weights as a Hugging Face model dir.

The directory holds config.json, model.safetensors, tokenizer.json and
tokenizer_config.json. Weights are drawn from a seeded normal distribution
(std 0.02; every RMSNorm weight is 1) so that every engine of the decode
benchmark loads the very same numbers. The tokenizer is a byte-level BPE
trained on the Python standard library's sources and padded with filler tokens
to exactly 49152 entries: its quality does not matter, only that every engine
loads it and that its size matches the embedding.

    python bench/peers/make_model.py --dtype bf16 --out target/bench-models/smollm2-135m-shaped-bf16

Needs numpy, safetensors and tokenizers (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
}

# SmolLM2's special tokens, at SmolLM2's ids.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]
BOS_ID = 1  # <|im_start|>
EOS_ID = 2  # <|im_end|>

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_SEED = 20250135
CORPUS_BYTES = 12 << 20


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in a fixed order; kind is 'normal' or 'ones'."""
    h = cfg["hidden_size"]
    i = cfg["intermediate_size"]
    d = cfg["head_dim"]
    q = cfg["num_attention_heads"] * d
    kv = cfg["num_key_value_heads"] * d
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "normal")]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,), "ones"),
            (f"{p}.self_attn.q_proj.weight", (q, h), "normal"),
            (f"{p}.self_attn.k_proj.weight", (kv, h), "normal"),
            (f"{p}.self_attn.v_proj.weight", (kv, h), "normal"),
            (f"{p}.self_attn.o_proj.weight", (h, q), "normal"),
            (f"{p}.post_attention_layernorm.weight", (h,), "ones"),
            (f"{p}.mlp.gate_proj.weight", (i, h), "normal"),
            (f"{p}.mlp.up_proj.weight", (i, h), "normal"),
            (f"{p}.mlp.down_proj.weight", (h, i), "normal"),
        ]
    specs.append(("model.norm.weight", (h,), "ones"))
    return specs


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16, returned as the raw uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def write_safetensors(path: Path, specs: list, dtype: str, metadata: dict, tensor_bytes) -> int:
    """Stream tensors into a safetensors file: an 8-byte aligned JSON header, then each tensor's raw
    little-endian data in `specs` order, as `tensor_bytes(shape, kind)` returns it. Written to a temporary
    file and renamed into place. Returns the parameter count."""
    st_dtype, width = ("F32", 4) if dtype == "f32" else ("BF16", 2)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in specs:
        n = int(np.prod(shape))
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n * width]}
        offset += n * width
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, shape, kind in specs:
            f.write(tensor_bytes(shape, kind))
        if f.tell() != 8 + len(head) + offset:
            raise SystemExit("safetensors write failed: tensor data does not match the header")
    os.replace(tmp, path)

    # Read the header back through the safetensors package as a format check.
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as st:
        if len(list(st.keys())) != len(specs):
            raise SystemExit("safetensors check failed: wrong tensor count")
    return offset // width


def write_weights(path: Path, cfg: dict, dtype: str, seed: int, std: float) -> int:
    """The model's tensors, drawn with numpy's seeded generator in tensor_specs order."""
    rng = np.random.default_rng(seed)

    def tensor_bytes(shape: tuple[int, ...], kind: str) -> bytes:
        if kind == "ones":
            w = np.ones(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(std)
        data = w if dtype == "f32" else f32_to_bf16_bits(w)
        return np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()

    return write_safetensors(path, tensor_specs(cfg), dtype, {"format": "pt"}, tensor_bytes)


def corpus_files() -> list[Path]:
    """The Python standard library's own sources: present wherever Python is, same for one Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    out, total = [], 0
    for p in files:
        try:
            size = p.stat().st_size
        except OSError:
            continue
        out.append(p)
        total += size
        if total >= CORPUS_BYTES:
            break
    return out


def corpus_iter(files: list[Path]):
    for p in files:
        try:
            yield p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue


def build_tokenizer(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_iter(corpus_files()), trainer=trainer)

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise SystemExit(f"trained vocab has {len(vocab)} entries, more than {vocab_size}")
    # Pad with filler tokens that no merge can produce (plain ASCII, so every
    # engine's byte-level decoder accepts them).
    next_id = max(vocab.values()) + 1
    n = 0
    while next_id < vocab_size:
        t = f"<filler_{n}>"
        n += 1
        if t in vocab:
            continue
        vocab[t] = next_id
        next_id += 1
    spec["model"]["vocab"] = vocab
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    text = json.dumps(spec, ensure_ascii=False, indent=2)
    check = Tokenizer.from_str(text)
    if check.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise SystemExit(f"tokenizer has {check.get_vocab_size(with_added_tokens=True)} entries, want {vocab_size}")
    return text


def config_json(cfg: dict, dtype: str) -> dict:
    torch_dtype = "float32" if dtype == "f32" else "bfloat16"
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": cfg["head_dim"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": cfg["rope_theta"],
        "tie_word_embeddings": cfg["tie_word_embeddings"],
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }


def tokenizer_config_json(cfg: dict) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[0],
        "pad_token": None,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["f32", "bf16"], required=True)
    ap.add_argument("--out", type=Path, help="output dir (default target/bench-models/smollm2-135m-shaped-DTYPE)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--tokenizer-from", type=Path, help="copy tokenizer.json from this file instead of training one")
    args = ap.parse_args()

    out = args.out or Path("target/bench-models") / f"smollm2-135m-shaped-{args.dtype}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPE)

    if args.tokenizer_from:
        tok_text = args.tokenizer_from.read_text(encoding="utf-8")
    else:
        tok_text = build_tokenizer(cfg["vocab_size"])
    (out / "tokenizer.json").write_text(tok_text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(cfg), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_json(cfg, args.dtype), indent=2) + "\n")
    n = write_weights(out / "model.safetensors", cfg, args.dtype, args.seed, args.std)
    print(f"wrote {out} ({n / 1e6:.1f}M parameters, {args.dtype}, seed {args.seed})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
