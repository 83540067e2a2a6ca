"""A Llama decoder in plain PyTorch over Hugging Face weights, with a preallocated KV cache.

Shared by torch_decode.py and torch_batched.py (the PyTorch peers of the CUDA decode benchmark);
not a script. It follows transformers' LlamaForCausalLM arithmetic (RMSNorm in f32 then cast,
rotate-half RoPE with llama3 frequency scaling, cos/sin computed in f32 and cast to the model
dtype, SiLU-gated MLP, tied or untied output projection) with these differences for speed:

- q/k/v and gate/up projections are fused into one matrix each (a concatenation of the rows);
- the KV cache is a preallocated (batch, max_len, kv_heads, head_dim) tensor per layer, written
  with index_copy_ at the positions held in a tensor, so a decode step has fixed shapes and no
  host synchronisation and can be captured in a CUDA graph;
- on CUDA a decode step attends with PyTorch's varlen FlashAttention kernel
  (aten._flash_attention_forward with seqused_k = position + 1: it reads only the cache rows in
  use, grouped-query attention without repeating K and V); elsewhere, or with
  decode_attn = "sdpa", with scaled_dot_product_attention over the whole cache and a boolean
  mask (key position <= current position), the query heads sharing a KV head laid out as that
  KV head's query rows;
- prefill starts at position 0 and uses causal attention over the prompt alone.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def rope_inv_freq(cfg: dict) -> torch.Tensor:
    """Inverse RoPE frequencies (f32), with llama3 scaling when config.json asks for it."""
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise SystemExit(f"rope_scaling type {kind!r} is not supported")
    factor = float(rs["factor"])
    low = float(rs["low_freq_factor"])
    high = float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    blend = (old_len / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(between, blended, scaled)


class Llama:
    """Decoder weights plus forward passes; KV caches are passed in (see new_cache)."""

    def __init__(self, cfg: dict, weights: dict, device: torch.device, dtype: torch.dtype, max_len: int):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.hidden = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.inter = cfg["intermediate_size"]
        self.vocab = cfg["vocab_size"]
        self.eps = float(cfg["rms_norm_eps"])
        self.scale = self.head_dim**-0.5
        # Cache positions, rounded up to a multiple of 16 (the attention mask's rows stay aligned).
        self.max_len = max_len = -(-max_len // 16) * 16

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        if cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in weights:
            self.lm_head = self.embed
        else:
            self.lm_head = w("lm_head.weight")
        self.norm = w("model.norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            self.layers.append(
                {
                    "attn_norm": w(f"{p}.input_layernorm.weight"),
                    "qkv": torch.cat([w(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"], 0).contiguous(),
                    "o": w(f"{p}.self_attn.o_proj.weight"),
                    "mlp_norm": w(f"{p}.post_attention_layernorm.weight"),
                    "gate_up": torch.cat([w(f"{p}.mlp.gate_proj.weight"), w(f"{p}.mlp.up_proj.weight")], 0).contiguous(),
                    "down": w(f"{p}.mlp.down_proj.weight"),
                }
            )
        inv = rope_inv_freq(cfg).to(device)
        t = torch.arange(max_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], -1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)
        self.key_pos = torch.arange(max_len, device=device)
        # Decode attention: "flash" (varlen FlashAttention reading only the used cache rows;
        # CUDA) or "sdpa" (scaled_dot_product_attention over the whole cache with a mask).
        self.decode_attn = "flash" if device.type == "cuda" else "sdpa"

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device, dtype: torch.dtype, max_len: int) -> "Llama":
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        weights: dict = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(str(f), device=str(device)))
        return cls(load_config(model_dir), weights, device, dtype, max_len)

    def param_count(self) -> int:
        n = self.embed.numel() + self.norm.numel()
        if self.lm_head is not self.embed:
            n += self.lm_head.numel()
        for L in self.layers:
            n += sum(t.numel() for t in L.values())
        return n

    def new_cache(self, batch: int) -> tuple[list, list]:
        shape = (batch, self.max_len, self.n_kv, self.head_dim)
        k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        return k, v

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, kc: list, vc: list, decode: bool) -> torch.Tensor:
        """Logits (batch, vocab) of the last position of `tokens` (batch, T).

        pos: (T,) int64 positions of the tokens, the same for every sequence of the batch.
        decode=True: T must be 1; attends over the cache up to pos. decode=False (prefill):
        pos must be 0..T-1; causal attention over the tokens themselves. Both write K and V
        into kc/vc (per layer (batch, max_len, kv_heads, head_dim)) at pos.
        """
        B, T = tokens.shape
        H, KV, D, L = self.n_heads, self.n_kv, self.head_dim, self.max_len
        G = H // KV
        x = F.embedding(tokens, self.embed)
        cos = self.cos.index_select(0, pos).view(1, T, 1, D)
        sin = self.sin.index_select(0, pos).view(1, T, 1, D)
        if decode and self.decode_attn == "flash":
            # Varlen FlashAttention over the fixed cache: sequence b's keys are rows
            # b*L .. b*L+pos of the flattened cache, of which the first pos+1 are used.
            cu_q = torch.arange(B + 1, device=self.device, dtype=torch.int32)
            cu_k = cu_q * L
            used = (pos + 1).to(torch.int32).expand(B).contiguous()
        elif decode:
            mask = (self.key_pos <= pos).view(1, 1, 1, L)
        for i, W in enumerate(self.layers):
            h = self._rms(x, W["attn_norm"])
            q, k, v = F.linear(h, W["qkv"]).split([H * D, KV * D, KV * D], -1)
            q = self._rope(q.view(B, T, H, D), cos, sin)
            k = self._rope(k.view(B, T, KV, D), cos, sin)
            v = v.view(B, T, KV, D)
            kc[i].index_copy_(1, pos, k)
            vc[i].index_copy_(1, pos, v)
            if decode and self.decode_attn == "flash":
                a = torch.ops.aten._flash_attention_forward(
                    q.reshape(B, H, D), kc[i].view(B * L, KV, D), vc[i].view(B * L, KV, D),
                    cu_q, cu_k, 1, L, 0.0, False, False, scale=self.scale, seqused_k=used,
                )[0]
                a = a.reshape(B, 1, H * D)
            elif decode:
                # (B, 1, H, D) -> (B, KV, G, D): query head h uses KV head h // G, so the G
                # query heads of a KV head become its G query rows.
                a = F.scaled_dot_product_attention(
                    q.reshape(B, KV, G, D), kc[i].transpose(1, 2), vc[i].transpose(1, 2), attn_mask=mask, scale=self.scale
                )
                a = a.reshape(B, 1, H * D)
            else:
                a = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale, enable_gqa=True
                )
                a = a.transpose(1, 2).reshape(B, T, H * D)
            x = x + F.linear(a, W["o"])
            h = self._rms(x, W["mlp_norm"])
            g, u = F.linear(h, W["gate_up"]).split([self.inter, self.inter], -1)
            x = x + F.linear(F.silu(g) * u, W["down"])
        x = self._rms(x[:, -1], self.norm)
        return F.linear(x, self.lm_head)


class GraphDecoder:
    """Greedy decode steps with fixed buffers: tok (batch,) in/out, pos (1,); optionally a CUDA graph.

    One step embeds `tok` at position `pos`, runs the layers, writes the argmax token back into
    `tok` and adds 1 to `pos`, so replaying the step N times decodes N tokens with no host work
    but the launches. `compile=True` runs the step through torch.compile (default mode, fixed
    shapes) before capture, so the graph replays Inductor's fused kernels.
    """

    def __init__(self, model: Llama, kc: list, vc: list, batch: int, use_graph: bool, compile: bool = False):
        self.model = model
        self.kc, self.vc = kc, vc
        self.tok = torch.zeros(batch, dtype=torch.int64, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=model.device)
        self.graph = None
        self.use_graph = use_graph
        self.fn = self._step
        if compile:
            # Every decoder (and batch size) compiles once: allow more than the default few.
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            self.fn = torch.compile(self._step, fullgraph=True, dynamic=False)

    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> None:
        logits = self.model.forward(tok.view(-1, 1), pos, self.kc, self.vc, decode=True)
        tok.copy_(logits.argmax(-1))
        pos.add_(1)

    def set(self, tok: torch.Tensor, pos: int) -> None:
        self.tok.copy_(tok.view(-1))
        self.pos.fill_(pos)

    def prepare(self, warmup: int = 3) -> None:
        """Run `warmup` steps (on a side stream when capturing), then capture the graph.

        The warm-up steps advance pos and write cache rows past it: call set() afterwards.
        Rows past the current position are masked and rewritten before they are attended.
        """
        if not self.use_graph:
            for _ in range(warmup):
                self.fn(self.tok, self.pos)
            return
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self.fn(self.tok, self.pos)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.fn(self.tok, self.pos)
        torch.cuda.synchronize()

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn(self.tok, self.pos)


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere; marks are read after sync()."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def intervals_ms(self) -> list[float]:
        self.sync()
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
