// Driftwood's CUDA kernels, compiled at run time with NVRTC (no CUDA headers needed).
//
// Conventions: activations are f32, weights bf16 (stored as raw `unsigned short`), row-major. The KV cache
// of a sequence lives in its actor's memory with layout (layer, {k, v}, max_seq, kv_dim) f32; kernels find it
// through the per-sequence `Seq` records of the current step.

typedef unsigned short bf16;
typedef unsigned long long u64;

#define INFINITY __int_as_float(0x7f800000)

// Mirrors `SeqStep` in step.rs (repr(C), 32 bytes).
struct Seq {
    u64 kv;        // device address of the sequence's KV cache
    u64 logits;    // device address of its logits (vocab) f32
    int pos;       // position of this step's token
    int max_seq;   // rows per (layer, k|v) in its cache
    unsigned token;
    int pad;
};

__device__ __forceinline__ float bf(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ float bf_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ bf16 to_bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                       // round to nearest even
    return (bf16)(u >> 16);
}

// Programmatic dependent launch (compute capability 9.0+). A kernel launched early (see `driver::launch`) may
// start while the kernel before it on the stream still runs: it prefetches what no earlier kernel writes (its
// weights), then `wait_prior()` blocks until the earlier kernel has completed with its writes visible. Every
// kernel here calls `wait_prior()` before its first read of activations, caches or step records and before its
// first global write, then `allow_next()` so that the next kernel can launch and prefetch in turn. On older
// devices, and for kernels launched normally, both are no-ops. The one exception, `kv_stage`, has neither and
// must only be launched normally (it runs on a side stream ordered by events).
__device__ __forceinline__ void wait_prior() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (blockDim.x >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// x (b, hidden) = table[seqs[b].token]. grid (b), block any.
extern "C" __global__ void embed(const bf16* __restrict__ table, const Seq* __restrict__ seqs, float* __restrict__ x,
                                 int hidden) {
    wait_prior();
    allow_next();
    int b = blockIdx.x;
    const bf16* row = table + (size_t)seqs[b].token * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(size_t)b * hidden + i] = bf(row[i]);
}

// y (b, n) = rmsnorm(x (b, n)) * w, written as bf16 (the input of a cuBLAS GEMM). grid (b), block 256.
extern "C" __global__ void rmsnorm_bf16(const float* __restrict__ x, const float* __restrict__ w, bf16* __restrict__ y,
                                        int n, float eps) {
    wait_prior();
    allow_next();
    const float* xr = x + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[(size_t)blockIdx.x * n + i] = to_bf(xr[i] * r * w[i]);
}

// Loads x (in) into shared memory, optionally RMS-normalized with weights `norm` (f32). All threads return
// after the barrier.
__device__ void load_x(float* xs, const float* __restrict__ x, const float* __restrict__ norm, int in, float eps) {
    for (int i = threadIdx.x * 4; i < in; i += blockDim.x * 4) *(float4*)&xs[i] = *(const float4*)&x[i];
    __syncthreads();
    if (norm) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < in; i += blockDim.x) ss += xs[i] * xs[i];
        float r = rsqrtf(block_sum(ss) / in + eps);
        for (int i = threadIdx.x; i < in; i += blockDim.x) xs[i] = xs[i] * r * norm[i];
        __syncthreads();
    }
}

// Two weight rows against xs, by one warp. The first PRE 16-byte vectors of each row per lane are loaded
// into registers by `prefetch2` before the block stages x, so the weight fetch overlaps that prologue.
#define PRE 8
struct Pre2 {
    uint4 a[PRE], b[PRE];
};

__device__ __forceinline__ void prefetch2(Pre2& p, const uint4* __restrict__ r0, const uint4* __restrict__ r1,
                                          int nv, int lane) {
#pragma unroll
    for (int i = 0; i < PRE; i++) {
        int v = lane + 32 * i;
        if (v < nv) {
            p.a[i] = __ldg(&r0[v]);
            p.b[i] = __ldg(&r1[v]);
        }
    }
}

__device__ __forceinline__ float dot8(uint4 p, const float* xs, int v) {
    const float4 a = *(const float4*)&xs[v * 8];
    const float4 c = *(const float4*)&xs[v * 8 + 4];
    return bf_lo(p.x) * a.x + bf_hi(p.x) * a.y + bf_lo(p.y) * a.z + bf_hi(p.y) * a.w + bf_lo(p.z) * c.x +
           bf_hi(p.z) * c.y + bf_lo(p.w) * c.z + bf_hi(p.w) * c.w;
}

__device__ __forceinline__ void dot2(const Pre2& p, const uint4* __restrict__ r0, const uint4* __restrict__ r1,
                                     const float* xs, int nv, int lane, float& a0, float& a1) {
#pragma unroll
    for (int i = 0; i < PRE; i++) {
        int v = lane + 32 * i;
        if (v < nv) {
            a0 += dot8(p.a[i], xs, v);
            a1 += dot8(p.b[i], xs, v);
        }
    }
#pragma unroll 4
    for (int v = lane + 32 * PRE; v < nv; v += 32) {
        uint4 w0 = __ldg(&r0[v]), w1 = __ldg(&r1[v]);
        a0 += dot8(w0, xs, v);
        a1 += dot8(w1, xs, v);
    }
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
}

// y (out) = [y +] W (out, in) · norm?(x) (+ bias). Each warp computes two output rows. grid
// ceil(out / (2·warps)), block 32·warps, dynamic shared memory in·4 bytes.
extern "C" __global__ void gemv(const bf16* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                                const float* __restrict__ bias, const float* __restrict__ norm, float eps, int in,
                                int out, int accumulate) {
    extern __shared__ float xs[];
    int lane = threadIdx.x & 31, nv = in >> 3;
    int row = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 2;
    bool active = row < out;
    int row2 = row + 1 < out ? row + 1 : row;
    const uint4* w0 = (const uint4*)(W + (size_t)row * in);
    const uint4* w1 = (const uint4*)(W + (size_t)row2 * in);
    Pre2 pre;
    if (active) prefetch2(pre, w0, w1, nv, lane);
    wait_prior();  // x and y belong to earlier kernels
    allow_next();
    load_x(xs, x, norm, in, eps);  // every thread takes part in its barriers
    if (!active) return;
    float a0 = 0.0f, a1 = 0.0f;
    dot2(pre, w0, w1, xs, nv, lane, a0, a1);
    if (lane == 0) {
        if (bias) a0 += bias[row];
        y[row] = accumulate ? y[row] + a0 : a0;
        if (row2 != row) {
            if (bias) a1 += bias[row2];
            y[row2] = accumulate ? y[row2] + a1 : a1;
        }
    }
}

// y (out) = silu(Wg · norm(x)) * (Wu · norm(x)): the SwiGLU gate and up projections fused, one output row
// per warp (its gate and up rows read together).
extern "C" __global__ void gemv_swiglu(const bf16* __restrict__ Wg, const bf16* __restrict__ Wu,
                                       const float* __restrict__ x, float* __restrict__ y,
                                       const float* __restrict__ norm, float eps, int in, int out) {
    extern __shared__ float xs[];
    int lane = threadIdx.x & 31, nv = in >> 3;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bool active = row < out;
    const uint4* gr = (const uint4*)(Wg + (size_t)(active ? row : 0) * in);
    const uint4* ur = (const uint4*)(Wu + (size_t)(active ? row : 0) * in);
    Pre2 pre;
    if (active) prefetch2(pre, gr, ur, nv, lane);
    wait_prior();
    allow_next();
    load_x(xs, x, norm, in, eps);
    if (!active) return;
    float g = 0.0f, u = 0.0f;
    dot2(pre, gr, ur, xs, nv, lane, g, u);
    if (lane == 0) y[row] = g / (1.0f + expf(-g)) * u;
}

// RoPE (rotate-half) on the queries and this step's key, then the key and value rows stored into each
// sequence's cache at its position. qkv (b, q_dim + 2 kv_dim) as the QKV projection left it; q is rotated in
// place. grid (b), block 128.
extern "C" __global__ void rope_store(float* __restrict__ qkv, const Seq* __restrict__ seqs,
                                      const float* __restrict__ inv_freq, int layer, int heads, int kv_heads,
                                      int head_dim) {
    wait_prior();
    allow_next();
    int b = blockIdx.x;
    Seq s = seqs[b];
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim, half = head_dim / 2;
    float* row = qkv + (size_t)b * (q_dim + 2 * kv_dim);
    float* kc = (float*)s.kv + ((size_t)(layer * 2 + 0) * s.max_seq + s.pos) * kv_dim;
    float* vc = (float*)s.kv + ((size_t)(layer * 2 + 1) * s.max_seq + s.pos) * kv_dim;
    int pairs = (heads + kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int h = p / half, i = p % half;
        float sn, cs;
        sincosf((float)s.pos * inv_freq[i], &sn, &cs);
        if (h < heads) {
            float* q = row + h * head_dim;
            float a = q[i], c = q[i + half];
            q[i] = a * cs - c * sn;
            q[i + half] = c * cs + a * sn;
        } else {
            int kh = h - heads;
            const float* k = row + q_dim + kh * head_dim;
            float a = k[i], c = k[i + half];
            kc[kh * head_dim + i] = a * cs - c * sn;
            kc[kh * head_dim + i + half] = c * cs + a * sn;
        }
    }
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) vc[i] = row[q_dim + kv_dim + i];
}

// Decode attention, split over the context: block (kv head, split, b) handles keys
// [split·chunk, min((split+1)·chunk, pos+1)) for the GROUP query heads sharing that KV head, reading each K
// and V row once. DIMS = head_dim / 32 values per lane. GROUP and DIMS are template parameters so that the
// per-lane arrays live in registers. Writes the split's running max, sum and unnormalized output to
// part (b, heads, splits, head_dim + 2). grid (kv_heads, splits, b), block 128 (4 warps).
// With `stage` non-null (one sequence, its cache in host memory), rows before the current position are read
// from `stage`, a device copy laid out as the cache that `kv_stage` made during this step; the current row
// from the cache itself.
template <int GROUP, int DIMS>
__device__ __forceinline__ void attn_split_impl(const float* __restrict__ qkv, const Seq* __restrict__ seqs,
                                                const float* __restrict__ stage, float* __restrict__ part,
                                                int layer, int kv_heads, int chunk, int splits, int window,
                                                float scale) {
    wait_prior();
    allow_next();
    const int head_dim = DIMS * 32, heads = kv_heads * GROUP;
    int kh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
    Seq s = seqs[b];
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int n = s.pos + 1;
    int lo = window > 0 && n > window ? n - window : 0;
    int start = max(split * chunk, lo), end = min((split + 1) * chunk, n);

    float q[GROUP][DIMS], o[GROUP][DIMS], m[GROUP], l[GROUP];
    const float* qrow = qkv + (size_t)b * (q_dim + 2 * kv_dim);
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
#pragma unroll
        for (int d = 0; d < DIMS; d++) {
            q[g][d] = qrow[(kh * GROUP + g) * head_dim + lane + 32 * d] * scale;
            o[g][d] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const size_t koff = (size_t)(layer * 2 + 0) * s.max_seq * kv_dim + kh * head_dim;
    const size_t voff = (size_t)(layer * 2 + 1) * s.max_seq * kv_dim + kh * head_dim;
    const float* kcache = (const float*)s.kv + koff;
    const float* vcache = (const float*)s.kv + voff;
    const float* kstage = stage ? stage + koff : kcache;
    const float* vstage = stage ? stage + voff : vcache;
    // Four keys per warp per iteration, loaded before any is used, so their loads overlap.
    for (int j0 = start + warp; j0 < end; j0 += 4 * warps) {
        float k[4][DIMS], v[4][DIMS];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * warps;
            const float* kb = j < s.pos ? kstage : kcache;
            const float* vb = j < s.pos ? vstage : vcache;
#pragma unroll
            for (int d = 0; d < DIMS; d++) {
                k[u][d] = j < end ? kb[(size_t)j * kv_dim + lane + 32 * d] : 0.0f;
                v[u][d] = j < end ? vb[(size_t)j * kv_dim + lane + 32 * d] : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (j0 + u * warps < end) {
                float dot[GROUP];
#pragma unroll
                for (int g = 0; g < GROUP; g++) {
                    dot[g] = 0.0f;
#pragma unroll
                    for (int d = 0; d < DIMS; d++) dot[g] += q[g][d] * k[u][d];
                }
                // The GROUP reductions interleave, so their shuffles overlap.
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
                    for (int g = 0; g < GROUP; g++) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
                }
#pragma unroll
                for (int g = 0; g < GROUP; g++) {
                    float mn = fmaxf(m[g], dot[g]);
                    float corr = __expf(m[g] - mn), p = __expf(dot[g] - mn);
                    l[g] = l[g] * corr + p;
#pragma unroll
                    for (int d = 0; d < DIMS; d++) o[g][d] = o[g][d] * corr + p * v[u][d];
                    m[g] = mn;
                }
            }
        }
    }
    // Merge the warps of the block through shared memory: (warps, GROUP, head_dim + 2).
    extern __shared__ float sh[];
    const int stride = head_dim + 2;
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        float* w = sh + (warp * GROUP + g) * stride;
#pragma unroll
        for (int d = 0; d < DIMS; d++) w[lane + 32 * d] = o[g][d];
        if (lane == 0) {
            w[head_dim] = m[g];
            w[head_dim + 1] = l[g];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GROUP * head_dim; idx += blockDim.x) {
        int g = idx / head_dim, d = idx % head_dim;
        float M = -INFINITY;
        for (int w = 0; w < warps; w++) M = fmaxf(M, sh[(w * GROUP + g) * stride + head_dim]);
        float L = 0.0f, acc = 0.0f;
        for (int w = 0; w < warps; w++) {
            const float* src = sh + (w * GROUP + g) * stride;
            float f = src[head_dim] == -INFINITY ? 0.0f : __expf(src[head_dim] - M);
            L += src[head_dim + 1] * f;
            acc += src[d] * f;
        }
        float* dst = part + (((size_t)b * heads + kh * GROUP + g) * splits + split) * stride;
        dst[d] = acc;
        if (d == 0) {
            dst[head_dim] = M;
            dst[head_dim + 1] = L;
        }
    }
}

#define ATTN_SPLIT(G, D)                                                                                        \
    extern "C" __global__ void attn_split_g##G##_d##D(const float* __restrict__ qkv, const Seq* __restrict__ seqs, \
                                                      const float* __restrict__ stage, float* __restrict__ part, \
                                                      int layer, int kv_heads, int chunk, int splits, int window, \
                                                      float scale) {                                              \
        attn_split_impl<G, D>(qkv, seqs, stage, part, layer, kv_heads, chunk, splits, window, scale);           \
    }
ATTN_SPLIT(1, 1) ATTN_SPLIT(1, 2) ATTN_SPLIT(1, 4)
ATTN_SPLIT(2, 1) ATTN_SPLIT(2, 2) ATTN_SPLIT(2, 4)
ATTN_SPLIT(4, 1) ATTN_SPLIT(4, 2) ATTN_SPLIT(4, 4)
ATTN_SPLIT(8, 1) ATTN_SPLIT(8, 2) ATTN_SPLIT(8, 4)

// Combines the splits of each (b, head) into att (b, q_dim), as f32 or (att_bf16 non-null) bf16.
// grid (heads, b), block head_dim.
extern "C" __global__ void attn_merge(const float* __restrict__ part, float* __restrict__ att,
                                      bf16* __restrict__ att_bf16, int heads, int head_dim, int splits) {
    wait_prior();
    allow_next();
    int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    int stride = head_dim + 2;
    const float* p = part + ((size_t)b * heads + h) * splits * stride;
    float M = -INFINITY;
    for (int s = 0; s < splits; s++) M = fmaxf(M, p[s * stride + head_dim]);
    float L = 0.0f, acc = 0.0f;
    for (int s = 0; s < splits; s++) {
        float ms = p[s * stride + head_dim];
        float f = ms == -INFINITY ? 0.0f : expf(ms - M);
        L += p[s * stride + head_dim + 1] * f;
        acc += p[s * stride + d] * f;
    }
    float r = acc / L;
    size_t i = (size_t)b * heads * head_dim + h * head_dim + d;
    if (att_bf16) att_bf16[i] = to_bf(r); else att[i] = r;
}

// act (b·ff) bf16 = silu(g) * u, from the gate and up projections g, u (b·ff) f32.
extern "C" __global__ void swiglu_bf16(const float* __restrict__ g, const float* __restrict__ u, bf16* __restrict__ act,
                                       int total) {
    wait_prior();
    allow_next();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x)
        act[i] = to_bf(g[i] / (1.0f + expf(-g[i])) * u[i]);
}

// Adds a per-row bias (f32) to y (b, n).
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias, int n, int total) {
    wait_prior();
    allow_next();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) y[i] += bias[i % n];
}

// Copies each sequence's logits row (b, vocab) to that sequence's own logits buffer.
extern "C" __global__ void scatter_logits(const float* __restrict__ logits, const Seq* __restrict__ seqs, int vocab) {
    wait_prior();
    allow_next();
    int b = blockIdx.y;
    float* dst = (float*)seqs[b].logits;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vocab; i += gridDim.x * blockDim.x)
        dst[i] = logits[(size_t)b * vocab + i];
}

// Copies the rows a step's attention reads before the current position, [max(0, pos + 1 - window), pos), of
// one layer's keys and values from the sequence's cache (seqs[0], page-locked host memory) to `stage`, laid
// out as the cache: (layer, {k, v}, max_seq, kv_dim) f32. Runs on a second stream while the weights of
// earlier layers stream, so the bus transfer overlaps them; the bytes still come from the cache every step.
// The cache address must be 16-byte aligned and kv_dim a multiple of 4. grid any, block 256.
extern "C" __global__ void kv_stage(const Seq* __restrict__ seqs, float* __restrict__ stage, int layer, int kv_dim,
                                    int window) {
    Seq s = seqs[0];
    int lo = window > 0 && s.pos + 1 > window ? s.pos + 1 - window : 0;
    size_t first = (size_t)lo * kv_dim / 4, n4 = (size_t)s.pos * kv_dim / 4;  // float4s of one k or v
    size_t step = (size_t)gridDim.x * blockDim.x;
    for (int kv = 0; kv < 2; kv++) {
        size_t off = (size_t)(layer * 2 + kv) * s.max_seq * kv_dim / 4;
        const float4* src = (const float4*)s.kv + off;
        float4* dst = (float4*)stage + off;
        // Four loads in flight per thread before their stores: the bus has a long latency.
        size_t i = first + blockIdx.x * blockDim.x + threadIdx.x;
        for (; i + 3 * step < n4; i += 4 * step) {
            float4 a = src[i], b = src[i + step], c = src[i + 2 * step], d = src[i + 3 * step];
            dst[i] = a;
            dst[i + step] = b;
            dst[i + 2 * step] = c;
            dst[i + 3 * step] = d;
        }
        for (; i < n4; i += step) dst[i] = src[i];
    }
}
