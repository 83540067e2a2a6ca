#!/usr/bin/env python3
"""Independent check of the golden files: a plain-NumPy Llama/Qwen2/Mistral
forward pass that reads only config.json (the older key names: rope_theta,
rope_scaling, torch_dtype) and model.safetensors, computes in float32 with a KV
cache, and compares with golden.safetensors under the tolerance in golden.json.

It doubles as a compact, readable statement of what the engine has to compute.
Needs only numpy and safetensors:

    python scripts/golden/check_numpy.py [case ...]

Cases made from an existing model directory (`make_golden.py --model-dir`) hold
only the golden files; their golden.json names the model directory
(`model_dir`, relative to the repository root), which is read instead.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOT = REPO_ROOT / "testdata" / "golden"


def load_weights(path: Path) -> dict[str, np.ndarray]:
    # safetensors.numpy cannot represent bfloat16; read the raw file instead.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf = raw[base + a: base + b]
        if meta["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4")
        elif meta["dtype"] == "BF16":
            # bf16 -> f32 is exact: put the 16 bits in the high half of an f32.
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(meta["dtype"])
        out[name] = arr.reshape(meta["shape"]).astype(np.float32)
    return out


def inv_freq(cfg: dict, head_dim: int) -> np.ndarray:
    theta = float(cfg.get("rope_theta", 10000.0))
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    inv = inv.astype(np.float32)
    sc = cfg.get("rope_scaling")
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, out).astype(np.float32)
    elif sc:
        raise ValueError(f"rope_scaling {sc} not handled here")
    return inv


def rms_norm(x, w, eps):
    var = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(eps))).astype(np.float32) * w


def rope(x, cos, sin):
    # rotate_half convention: halves, not interleaved pairs.
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


class Model:
    def __init__(self, d: Path):
        self.cfg = json.loads((d / "config.json").read_text())
        self.w = load_weights(d / "model.safetensors")
        c = self.cfg
        self.H, self.KV = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c["hidden_size"] // self.H
        self.eps = c["rms_norm_eps"]
        self.inv = inv_freq(c, self.hd)
        # Tied when the config says so or the checkpoint has no lm_head.
        self.lm_head = self.w.get("lm_head.weight")
        if c.get("tie_word_embeddings", False) or self.lm_head is None:
            assert "lm_head.weight" not in self.w
            self.lm_head = self.w["model.embed_tokens.weight"]
        # Qwen2: the window only applies when use_sliding_window is true.
        win = c.get("sliding_window")
        if c.get("model_type") == "qwen2" and not c.get("use_sliding_window", False):
            win = None
        self.window = win
        self.cache = [([], []) for _ in range(c["num_hidden_layers"])]
        self.pos = 0

    def lin(self, x, name):
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y + b if b is not None else y

    def forward(self, ids: list[int]) -> np.ndarray:
        T = len(ids)
        pos = np.arange(self.pos, self.pos + T, dtype=np.float32)
        ang = np.outer(pos, self.inv).astype(np.float32)
        emb = np.concatenate([ang, ang], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        x = self.w["model.embed_tokens.weight"][ids]
        for li, (kc, vc) in enumerate(self.cache):
            p = f"model.layers.{li}."
            h = rms_norm(x, self.w[p + "input_layernorm.weight"], self.eps)
            q = self.lin(h, p + "self_attn.q_proj").reshape(T, self.H, self.hd).transpose(1, 0, 2)
            k = self.lin(h, p + "self_attn.k_proj").reshape(T, self.KV, self.hd).transpose(1, 0, 2)
            v = self.lin(h, p + "self_attn.v_proj").reshape(T, self.KV, self.hd).transpose(1, 0, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            kc.append(k)
            vc.append(v)
            K, V = np.concatenate(kc, axis=1), np.concatenate(vc, axis=1)
            S = K.shape[1]
            rep = self.H // self.KV
            K, V = np.repeat(K, rep, axis=0), np.repeat(V, rep, axis=0)
            scores = (q @ K.transpose(0, 2, 1)) / np.float32(math.sqrt(self.hd))
            qpos = np.arange(self.pos, self.pos + T)[:, None]
            kpos = np.arange(S)[None, :]
            mask = kpos > qpos
            if self.window is not None:
                mask |= kpos <= qpos - self.window
            scores = np.where(mask, -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ V
            x = x + self.lin(attn.transpose(1, 0, 2).reshape(T, -1), p + "self_attn.o_proj")
            h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], self.eps)
            g = self.lin(h, p + "mlp.gate_proj")
            u = self.lin(h, p + "mlp.up_proj")
            x = x + self.lin((g / (1 + np.exp(-g))) * u, p + "mlp.down_proj")
        self.pos += T
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        return (x @ self.lm_head.T).astype(np.float32)


def check(case: str) -> bool:
    d = ROOT / case
    info = json.loads((d / "golden.json").read_text())
    g = load_file(str(d / "golden.safetensors"))
    m = Model(REPO_ROOT / info["model_dir"] if "model_dir" in info else d)
    prefill = m.forward(g["prompt_ids"].tolist())
    rows, greedy = [prefill[-1]], []
    for _ in range(len(g["greedy_ids"])):
        t = int(np.argmax(rows[-1]))
        greedy.append(t)
        rows.append(m.forward([t])[-1])
    steps = np.stack(rows)
    tol = info["tolerance"]["rel"]
    errs = {k: float(np.abs(ours - g[k]).max() / np.abs(g[k]).max())
            for k, ours in (("prefill_logits", prefill), ("step_logits", steps))}
    same = greedy == g["greedy_ids"].tolist()
    ok = same and all(e <= tol for e in errs.values())
    print(f"{case:16s} {'ok' if ok else 'FAIL'}  rel err prefill {errs['prefill_logits']:.2e} "
          f"steps {errs['step_logits']:.2e} (tol {tol:g})  greedy {'same' if same else greedy}")
    return ok


def main() -> None:
    cases = sys.argv[1:] or sorted(p.name for p in ROOT.iterdir() if (p / "golden.json").exists())
    results = [check(c) for c in cases]
    if not all(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
