"""The prefill kernels of crates/backend/src/cuda/kernels/ checked one by one against PyTorch on the GPU, and timed.

    python3 scripts/device/kernels/check_prefill_kernels.py [--out FILE.json]

Compiles the kernel sources with NVRTC through CuPy (as the backend does, plus small test entry points that take
the attention parameters as scalars), runs each kernel on random inputs (fresh per case; outputs poisoned with
NaN first, so an unwritten element fails) and compares with a float32 reference computed by PyTorch from the
same bf16 inputs:

- attn_prefill: causal grouped-query attention with a cached prefix (keys before pos0 from the cache, the rest
  from the chunk's copies; the cache rows of the chunk itself hold NaN, so reading them fails the check), head
  dims 32/64/128, groups 1/2/4, sliding windows, sizes that are not multiples of the tiles;
- rope_prefill: rotated, scaled queries, keys and values into the copies and the cache;
- swiglu_pairs_bf16.

Then times attn_prefill at the Llama-3.2-1B shape (32 heads, 8 KV heads, head_dim 64) for 1024 and 4096 tokens,
and cuBLAS (through torch.matmul) on the prefill GEMM shapes, against the bf16 matrix peak. Exits non-zero if a
check fails. Needs torch and cupy with a CUDA device.
"""

import argparse
import json
import math
import pathlib
import sys

import cupy as cp
import torch

ROOT = pathlib.Path(__file__).resolve().parents[3]
KDIR = ROOT / "crates/backend/src/cuda/kernels"
SOURCES = ["common.cuh", "elementwise.cu", "gemv.cu", "attn_decode.cu", "attn_prefill.cu"]

TEST_ENTRY = """
#define TEST_ATTN(D) extern "C" __global__ void __launch_bounds__(128) test_attn_d##D(u64 q, u64 cache, u64 knew, \\
    u64 vnew, u64 out, int t, int pos0, int max_seq, int layer, int heads, int kv_heads, int window) { \\
    AttnPrefill p; p.q = q; p.cache = cache; p.knew = knew; p.vnew = vnew; p.out = out; p.t = t; p.pos0 = pos0; \\
    p.max_seq = max_seq; p.layer = layer; p.heads = heads; p.kv_heads = kv_heads; p.window = window; p.pad = 0; \\
    attn_prefill_impl<D, (D > 64 ? 1 : 2), 4>(p); }
TEST_ATTN(32) TEST_ATTN(64) TEST_ATTN(128)
#define VARIANT(NAME, D, MT, W) extern "C" __global__ void __launch_bounds__(32 * W) NAME(u64 q, u64 cache, \
    u64 knew, u64 vnew, u64 out, int t, int pos0, int max_seq, int layer, int heads, int kv_heads, int window) { \
    AttnPrefill p; p.q = q; p.cache = cache; p.knew = knew; p.vnew = vnew; p.out = out; p.t = t; p.pos0 = pos0; \
    p.max_seq = max_seq; p.layer = layer; p.heads = heads; p.kv_heads = kv_heads; p.window = window; p.pad = 0; \
    attn_prefill_impl<D, MT, W>(p); }
VARIANT(v64_mt1_w4, 64, 1, 4) VARIANT(v64_mt1_w8, 64, 1, 8) VARIANT(v64_mt2_w8, 64, 2, 8)
"""

# Variants of the 64-wide kernel timed next to the one the backend launches: (entry, m-tiles per warp, warps).
VARIANTS = [("test_attn_d64", 2, 4), ("v64_mt1_w4", 1, 4), ("v64_mt1_w8", 1, 8), ("v64_mt2_w8", 2, 8)]


def module():
    src = "".join((KDIR / s).read_text() for s in SOURCES) + TEST_ENTRY
    arch = "compute_%d%d" % torch.cuda.get_device_capability()
    return cp.RawModule(code=src, options=("--std=c++17", "-arch=" + arch))


def launch_shape(hd):
    """Query rows per block and dynamic shared memory, as `prefill_rows`/`prefill_shared` in cuda/mod.rs."""
    rows = 64 if hd > 64 else 128
    return rows, (rows + 4 * 64) * hd * 2


def ptr(t):
    return cp.uint64(t.data_ptr())


def rel_err(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def attn_case(mod, hd, heads, kv_heads, t, pos0, window, layers=2, layer=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kv_dim = kv_heads * hd
    max_seq = pos0 + t + 13
    scale = math.log2(math.e) / math.sqrt(hd)
    q = (torch.randn(t, heads, hd, device="cuda", generator=g) * scale).bfloat16()
    cache = torch.randn(layers, 2, max_seq, kv_dim, device="cuda", generator=g).bfloat16()
    cache[:, :, pos0:] = float("nan")  # the chunk's own rows must come from knew/vnew
    knew = torch.randn(t, kv_dim, device="cuda", generator=g).bfloat16()
    vnew = torch.randn(t, kv_dim, device="cuda", generator=g).bfloat16()
    out = torch.full((t, heads * hd), float("nan"), device="cuda").bfloat16()
    fn = mod.get_function("test_attn_d%d" % hd)
    rows, shared = launch_shape(hd)
    fn.max_dynamic_shared_size_bytes = shared
    args = (ptr(q), ptr(cache), ptr(knew), ptr(vnew), ptr(out), cp.int32(t), cp.int32(pos0), cp.int32(max_seq),
            cp.int32(layer), cp.int32(heads), cp.int32(kv_heads), cp.int32(window))
    grid = ((t + rows - 1) // rows, heads, 1)
    fn(grid, (128, 1, 1), args, shared_mem=shared)
    torch.cuda.synchronize()
    # Reference in float32 from the same bf16 values.
    k = torch.cat([cache[layer, 0, :pos0], knew]).float().view(pos0 + t, kv_heads, hd)
    v = torch.cat([cache[layer, 1, :pos0], vnew]).float().view(pos0 + t, kv_heads, hd)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # (n, heads, hd)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("thd,nhd->htn", q.float(), k) * math.log(2.0)  # natural-log units
    qpos = torch.arange(pos0, pos0 + t, device="cuda")[:, None]
    kpos = torch.arange(pos0 + t, device="cuda")[None, :]
    allowed = kpos <= qpos
    if window > 0:
        allowed &= kpos > qpos - window
    s = s.masked_fill(~allowed[None], float("-inf"))
    ref = torch.einsum("htn,nhd->thd", torch.softmax(s, dim=-1), v).reshape(t, heads * hd)
    return rel_err(out.float(), ref)


def attn_time(mod, hd, heads, kv_heads, t, reps=20, entry=None, mt=None, warps=4):
    kv_dim = kv_heads * hd
    q = torch.randn(t, heads, hd, device="cuda").bfloat16()
    cache = torch.randn(1, 2, t, kv_dim, device="cuda").bfloat16()
    knew = torch.randn(t, kv_dim, device="cuda").bfloat16()
    vnew = torch.randn(t, kv_dim, device="cuda").bfloat16()
    out = torch.empty(t, heads * hd, device="cuda").bfloat16()
    fn = mod.get_function(entry or "test_attn_d%d" % hd)
    rows, shared = launch_shape(hd)
    if mt is not None:
        rows = 16 * mt * warps
        shared = (rows + 4 * 64) * hd * 2
    fn.max_dynamic_shared_size_bytes = shared
    args = (ptr(q), ptr(cache), ptr(knew), ptr(vnew), ptr(out), cp.int32(t), cp.int32(0), cp.int32(t), cp.int32(0),
            cp.int32(heads), cp.int32(kv_heads), cp.int32(0))
    grid = ((t + rows - 1) // rows, heads, 1)
    block = (32 * warps, 1, 1)
    for _ in range(3):
        fn(grid, block, args, shared_mem=shared)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn(grid, block, args, shared_mem=shared)
    b.record()
    torch.cuda.synchronize()
    ms = a.elapsed_time(b) / reps
    flops = 4.0 * heads * hd * (t * (t + 1) / 2)
    return ms, flops / ms / 1e9  # TFLOP/s


def sdpa_time(heads, kv_heads, hd, t, reps=20):
    """PyTorch's fused causal attention on the same shape, for comparison."""
    q = torch.randn(1, heads, t, hd, device="cuda").bfloat16()
    k = torch.randn(1, kv_heads, t, hd, device="cuda").bfloat16()
    v = torch.randn(1, kv_heads, t, hd, device="cuda").bfloat16()
    f = torch.nn.functional.scaled_dot_product_attention
    for _ in range(3):
        f(q, k, v, is_causal=True, enable_gqa=True)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        f(q, k, v, is_causal=True, enable_gqa=True)
    b.record()
    torch.cuda.synchronize()
    ms = a.elapsed_time(b) / reps
    return ms, 4.0 * heads * hd * (t * (t + 1) / 2) / ms / 1e9  # TFLOP/s


def rope_case(mod, hd, heads, kv_heads, t, pos0, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qd, kvd = heads * hd, kv_heads * hd
    max_seq = pos0 + t + 3
    qkv = torch.randn(t, qd + 2 * kvd, device="cuda", generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
    qscale = math.log2(math.e) / math.sqrt(hd)
    q_out = torch.full((t, qd), float("nan"), device="cuda").bfloat16()
    knew = torch.full((t, kvd), float("nan"), device="cuda").bfloat16()
    vnew = torch.full((t, kvd), float("nan"), device="cuda").bfloat16()
    cache = torch.full((2, 2, max_seq, kvd), float("nan"), device="cuda").bfloat16()
    fn = mod.get_function("rope_prefill")
    fn((t, 1, 1), (128, 1, 1), (ptr(qkv), ptr(inv_freq), ptr(q_out), ptr(knew), ptr(vnew), ptr(cache), cp.int32(1),
                                cp.int32(pos0), cp.int32(max_seq), cp.int32(heads), cp.int32(kv_heads),
                                cp.int32(hd), cp.float32(qscale)))
    torch.cuda.synchronize()
    pos = torch.arange(pos0, pos0 + t, device="cuda").float()
    ang = pos[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rot(x, nh):
        x = x.view(t, nh, hd)
        a, c = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos[:, None] - c * sin[:, None], c * cos[:, None] + a * sin[:, None]], -1).reshape(t, -1)

    rq = rot(qkv[:, :qd], heads) * qscale
    rk = rot(qkv[:, qd:qd + kvd], kv_heads)
    rv = qkv[:, qd + kvd:]
    errs = [rel_err(q_out.float(), rq), rel_err(knew.float(), rk), rel_err(vnew.float(), rv),
            rel_err(cache[1, 0, pos0:pos0 + t].float(), rk), rel_err(cache[1, 1, pos0:pos0 + t].float(), rv)]
    untouched = bool(torch.isnan(cache[1, :, :pos0].float()).all() and torch.isnan(cache[0].float()).all())
    return max(errs), untouched


def swiglu_case(mod, t, ff, seed=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gu = torch.randn(t, 2 * ff, device="cuda", generator=g).bfloat16()
    act = torch.full((t, ff), float("nan"), device="cuda").bfloat16()
    fn = mod.get_function("swiglu_pairs_bf16")
    n = t * ff // 8
    fn((min((n + 255) // 256, 8192), 1, 1), (256, 1, 1), (ptr(gu), ptr(act), cp.int32(t), cp.int32(ff)))
    torch.cuda.synchronize()
    gate, up = gu[:, :ff].float(), gu[:, ff:].float()
    return rel_err(act.float(), torch.nn.functional.silu(gate) * up)


def gemm_time(m, n, k, out_dtype, reps=20):
    a = torch.randn(m, k, device="cuda").bfloat16()
    w = torch.randn(n, k, device="cuda").bfloat16()
    for _ in range(3):
        c = torch.matmul(a, w.t()).to(out_dtype)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        c = torch.matmul(a, w.t())
    ev[1].record()
    torch.cuda.synchronize()
    ms = ev[0].elapsed_time(ev[1]) / reps
    return ms, 2.0 * m * n * k / ms / 1e9  # TFLOP/s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    mod = module()
    results = {"device": torch.cuda.get_device_name(), "attn": [], "rope": [], "swiglu": [], "timing": []}
    ok = True
    attn_cases = [
        (64, 32, 8, 300, 0, 0), (64, 32, 8, 200, 77, 0), (64, 8, 8, 64, 0, 0), (64, 8, 2, 1, 130, 0),
        (32, 8, 4, 130, 5, 0), (32, 8, 4, 17, 0, 0), (128, 8, 2, 100, 0, 0), (128, 16, 4, 129, 64, 0),
        (64, 8, 2, 257, 31, 50), (64, 8, 2, 200, 0, 64), (32, 4, 4, 70, 100, 8),
    ]
    for hd, h, kvh, t, pos0, win in attn_cases:
        e = attn_case(mod, hd, h, kvh, t, pos0, win)
        good = e < 2e-2
        ok &= good
        results["attn"].append({"head_dim": hd, "heads": h, "kv_heads": kvh, "t": t, "pos0": pos0, "window": win,
                                "rel_err": e, "ok": good})
        print("attn_prefill hd=%d heads=%d kv=%d t=%d pos0=%d window=%d: rel err %.2e %s"
              % (hd, h, kvh, t, pos0, win, e, "ok" if good else "FAIL"), flush=True)
    for hd, h, kvh, t, pos0 in [(64, 32, 8, 300, 0), (32, 8, 4, 33, 100), (128, 4, 2, 5, 7)]:
        e, untouched = rope_case(mod, hd, h, kvh, t, pos0)
        good = e < 1e-2 and untouched
        ok &= good
        results["rope"].append({"head_dim": hd, "t": t, "pos0": pos0, "rel_err": e, "other_rows_untouched": untouched})
        print("rope_prefill hd=%d t=%d pos0=%d: rel err %.2e, other rows untouched %s %s"
              % (hd, t, pos0, e, untouched, "ok" if good else "FAIL"), flush=True)
    for t, ff in [(300, 8192), (7, 688)]:
        e = swiglu_case(mod, t, ff)
        good = e < 1e-2
        ok &= good
        results["swiglu"].append({"t": t, "ff": ff, "rel_err": e})
        print("swiglu_pairs t=%d ff=%d: rel err %.2e %s" % (t, ff, e, "ok" if good else "FAIL"), flush=True)
    for t in [1024, 4096]:
        for entry, mt, warps in VARIANTS:
            ms, tflops = attn_time(mod, 64, 32, 8, t, entry=entry, mt=mt, warps=warps)
            results["timing"].append({"kernel": entry, "m_tiles": mt, "warps": warps, "t": t, "ms": ms,
                                      "tflops": tflops})
            print("time %s (m-tiles %d, warps %d) t=%d (32 heads, 8 kv, hd 64): %.3f ms, %.0f TFLOP/s"
                  % (entry, mt, warps, t, ms, tflops))
        ms, tflops = sdpa_time(32, 8, 64, t)
        results["timing"].append({"kernel": "torch sdpa causal gqa", "t": t, "ms": ms, "tflops": tflops})
        print("time torch sdpa t=%d: %.3f ms, %.0f TFLOP/s" % (t, ms, tflops))
    for (m, n, k) in [(4096, 3072, 2048), (4096, 2048, 2048), (4096, 16384, 2048), (4096, 2048, 8192),
                      (1024, 16384, 2048), (128, 16384, 2048)]:
        ms, tflops = gemm_time(m, n, k, torch.bfloat16)
        results["timing"].append({"kernel": "torch.matmul bf16", "m": m, "n": n, "k": k, "ms": ms,
                                  "tflops": tflops})
        print("time gemm %dx%dx%d: %.3f ms, %.0f TFLOP/s" % (m, n, k, ms, tflops))
    results["ok"] = ok
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print("prefill kernels:", "all checks passed" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
