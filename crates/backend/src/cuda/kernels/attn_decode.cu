// Decode attention: one new query row per sequence against its own cache, split over the context and merged.

// Decode attention, split over the context: block (kv head, split, b) handles keys
// [split·chunk, min((split+1)·chunk, pos+1)) for the GROUP query heads sharing that KV head, reading each K
// and V row once. DIMS = head_dim / 32 values per lane. GROUP and DIMS are template parameters so that the
// per-lane arrays live in registers. Writes the split's running max, sum and unnormalized output to
// part (b, heads, splits, head_dim + 2). grid (kv_heads, splits, b), block 128 (4 warps).
// Keys and values are bf16. With `stage` non-null (one sequence, its cache in host memory), rows before the
// current position are read from `stage`, a device copy laid out as the cache that `kv_stage` made during this
// step; the current row from the cache itself.
template <int GROUP, int DIMS>
__device__ __forceinline__ void attn_split_impl(const float* __restrict__ qkv, const Seq* __restrict__ seqs,
                                                const bf16* __restrict__ stage, float* __restrict__ part,
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
    const bf16* kcache = (const bf16*)s.kv + koff;
    const bf16* vcache = (const bf16*)s.kv + voff;
    const bf16* kstage = stage ? stage + koff : kcache;
    const bf16* vstage = stage ? stage + voff : vcache;
    // Four keys per warp per iteration, loaded before any is used, so their loads overlap.
    for (int j0 = start + warp; j0 < end; j0 += 4 * warps) {
        float k[4][DIMS], v[4][DIMS];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * warps;
            const bf16* kb = j < s.pos ? kstage : kcache;
            const bf16* vb = j < s.pos ? vstage : vcache;
#pragma unroll
            for (int d = 0; d < DIMS; d++) {
                k[u][d] = j < end ? bf(kb[(size_t)j * kv_dim + lane + 32 * d]) : 0.0f;
                v[u][d] = j < end ? bf(vb[(size_t)j * kv_dim + lane + 32 * d]) : 0.0f;
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
                                                      const bf16* __restrict__ stage, float* __restrict__ part, \
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

// Copies the rows a step's attention reads before the current position, [max(0, pos + 1 - window), pos), of
// one layer's keys and values from the sequence's cache (seqs[0], page-locked host memory) to `stage`, laid
// out as the cache: (layer, {k, v}, max_seq, kv_dim) bf16. Runs on a second stream while the weights of
// earlier layers stream, so the bus transfer overlaps them; the bytes still come from the cache every step.
// The cache address must be 16-byte aligned and kv_dim a multiple of 8. grid any, block 256.
extern "C" __global__ void kv_stage(const Seq* __restrict__ seqs, bf16* __restrict__ stage, int layer, int kv_dim,
                                    int window) {
    Seq s = seqs[0];
    int lo = window > 0 && s.pos + 1 > window ? s.pos + 1 - window : 0;
    size_t first = (size_t)lo * kv_dim / 8, n8 = (size_t)s.pos * kv_dim / 8;  // 16-byte units of one k or v
    size_t step = (size_t)gridDim.x * blockDim.x;
    for (int kv = 0; kv < 2; kv++) {
        size_t off = (size_t)(layer * 2 + kv) * s.max_seq * kv_dim / 8;
        const uint4* src = (const uint4*)s.kv + off;
        uint4* dst = (uint4*)stage + off;
        // Four loads in flight per thread before their stores: the bus has a long latency.
        size_t i = first + blockIdx.x * blockDim.x + threadIdx.x;
        for (; i + 3 * step < n8; i += 4 * step) {
            uint4 a = src[i], b = src[i + step], c = src[i + 2 * step], d = src[i + 3 * step];
            dst[i] = a;
            dst[i + step] = b;
            dst[i + 2 * step] = c;
            dst[i + 3 * step] = d;
        }
        for (; i < n8; i += step) dst[i] = src[i];
    }
}
