#!/usr/bin/env python3
"""Convert a Hugging Face Llama model dir (as made by make_model.py) to a GGUF file for llama.cpp.

    python bench/peers/to_gguf.py target/bench-models/smollm2-135m-shaped-bf16 [--out FILE.gguf]

Keeps the weights' dtype (F32 or BF16; 1-D norm weights are stored as F32, as llama.cpp's own
converter does). Q and K projections are permuted from Hugging Face's rotate-half RoPE layout to
GGUF's interleaved layout exactly like llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), so
the GGUF computes the same function as the safetensors. The byte-level BPE tokenizer
(tokenizer.json) goes in as tokenizer.ggml.model "gpt2" with its tokens, types and merges.

Needs numpy and gguf (no torch). Reads safetensors directly (numpy has no bfloat16).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf

ST_DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype("<u2"), "F16": np.dtype("<f2")}


def read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, array); BF16 comes back as its raw uint16 bits. Memory-mapped."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise SystemExit(f"{name}: unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        out[name] = (info["dtype"], data[b:e].view(dt).reshape(info["shape"]))
    return out


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> GGUF interleaved rows (per head)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, cfg: dict, vocab_size: int) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok["model"]["type"] != "BPE":
        raise SystemExit("only byte-level BPE tokenizers are supported")
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    special_ids = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special_ids.add(added["id"])
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != vocab_size or max(by_id) != vocab_size - 1:
        raise SystemExit(f"tokenizer has {len(by_id)} ids, model vocab_size is {vocab_size}")

    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    # The tokenizer's pre-tokenizer is ByteLevel with GPT-2's split regex.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        writer.add_bos_token_id(cfg["bos_token_id"])
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    tc_path = model_dir / "tokenizer_config.json"
    if tc_path.exists():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        if tc.get("chat_template"):
            writer.add_chat_template(tc["chat_template"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, help="default: MODEL_DIR.gguf, beside the dir")
    args = ap.parse_args()

    cfg = json.loads((args.model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"model_type {cfg.get('model_type')!r} is not llama")
    if cfg.get("rope_scaling"):
        raise SystemExit("rope_scaling is not handled by this converter")
    tensors = read_safetensors(args.model_dir / "model.safetensors")
    out = args.out or args.model_dir.with_name(args.model_dir.name + ".gguf")

    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim", hidden // n_head)
    n_layer = cfg["num_hidden_layers"]
    vocab_size = cfg["vocab_size"]

    wdtype = tensors["model.embed_tokens.weight"][0]
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
             "F16": gguf.LlamaFileType.MOSTLY_F16}[wdtype]

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(args.model_dir.name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(ftype)
    add_tokenizer(writer, args.model_dir, cfg, vocab_size)

    def put(gguf_name: str, hf_name: str, perm: int | None = None, perm_kv: int | None = None) -> None:
        st_dtype, w = tensors.pop(hf_name)
        if perm is not None:
            w = permute(w, perm, perm_kv)
        if w.ndim == 1 or st_dtype == "F32":
            # 1-D tensors (norms) go in as F32, as llama.cpp's converter stores them.
            if st_dtype == "BF16":
                w = (w.astype(np.uint32) << 16).view(np.float32)
            writer.add_tensor(gguf_name, np.ascontiguousarray(w, dtype=np.float32))
        elif st_dtype == "BF16":
            writer.add_tensor(gguf_name, np.ascontiguousarray(w).view(np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w))

    put("token_embd.weight", "model.embed_tokens.weight")
    for i in range(n_layer):
        p = f"model.layers.{i}"
        put(f"blk.{i}.attn_norm.weight", f"{p}.input_layernorm.weight")
        put(f"blk.{i}.attn_q.weight", f"{p}.self_attn.q_proj.weight", n_head, n_head)
        put(f"blk.{i}.attn_k.weight", f"{p}.self_attn.k_proj.weight", n_head, n_kv)
        put(f"blk.{i}.attn_v.weight", f"{p}.self_attn.v_proj.weight")
        put(f"blk.{i}.attn_output.weight", f"{p}.self_attn.o_proj.weight")
        put(f"blk.{i}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight")
        put(f"blk.{i}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight")
        put(f"blk.{i}.ffn_up.weight", f"{p}.mlp.up_proj.weight")
        put(f"blk.{i}.ffn_down.weight", f"{p}.mlp.down_proj.weight")
    put("output_norm.weight", "model.norm.weight")
    if "lm_head.weight" in tensors and not cfg.get("tie_word_embeddings", False):
        put("output.weight", "lm_head.weight")
    tensors.pop("lm_head.weight", None)  # tied: llama.cpp falls back to token_embd
    if tensors:
        raise SystemExit(f"unconverted tensors: {sorted(tensors)[:5]}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    print(f"wrote {out} ({wdtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
