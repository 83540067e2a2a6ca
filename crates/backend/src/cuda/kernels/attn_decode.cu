// Decode attention: one new query row per sequence against its own cache, split over the context, the splits
// merged by the last block of each (sequence, KV head) to finish (no merge kernel).
//
// Splits are fixed per graph (ceil(max_seq / chunk)); a step uses those that hold its keys: [first, last) of
// `active_splits`. The blocks of the others return at once, so a large cache costs a short context nothing.

// The splits of a step that hold keys: [lo / chunk, ceil(n / chunk)) for keys [lo, n).
__device__ __forceinline__ void active_splits(const Seq& s, int chunk, int window, int& first, int& last) {
    int n = s.pos + 1;
    int lo = window > 0 && n > window ? n - window : 0;
    first = lo / chunk;
    last = (n + chunk - 1) / chunk;
}

// The end of a block of decode attention, called by all its threads after each wrote its share of the block's
// split to part (b, heads, splits, head_dim + 2): a split's max, sum of exponentials and unnormalized output
// per query head. The block that finishes last among the (b, kv head)'s active splits [first, last) merges
// them into att (b, q_dim) f32, or bf16 into att_bf16 when non-null, and resets the (b, kv head)'s counter in
// `counts` (b, kv_heads) to 0 for the next step. Counters are zero before a step's first launch.
//
// Ordering: each thread fences its part writes device-wide before the barrier, thread 0 counts after it; the
// last block fences again and reads the other blocks' parts from L2 (ld.global.cg), never a stale L1 line.
template <int GROUP>
__device__ __forceinline__ void finish_splits(const float* __restrict__ part, float* __restrict__ att,
                                              bf16* __restrict__ att_bf16, unsigned* __restrict__ counts, int b,
                                              int kh, int kv_heads, int head_dim, int splits, int first,
                                              int last) {
    __shared__ unsigned last_block;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* c = counts + (size_t)b * kv_heads + kh;
        unsigned done = atomicAdd(c, 1u) + 1u;
        last_block = done == (unsigned)(last - first);
        if (last_block) *c = 0u;  // every block of this (b, kv head) has counted: none reads it again this step
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    const int heads = kv_heads * GROUP, stride = head_dim + 2;
    for (int idx = threadIdx.x; idx < GROUP * head_dim; idx += blockDim.x) {
        int g = idx / head_dim, d = idx % head_dim, h = kh * GROUP + g;
        const float* p = part + ((size_t)b * heads + h) * splits * stride;
        float M = -INFINITY;
        for (int s = first; s < last; s++) M = fmaxf(M, __ldcg(p + s * stride + head_dim));
        float L = 0.0f, acc = 0.0f;
        for (int s = first; s < last; s++) {
            float ms = __ldcg(p + s * stride + head_dim);
            float f = ms == -INFINITY ? 0.0f : expf(ms - M);
            L += __ldcg(p + s * stride + head_dim + 1) * f;
            acc += __ldcg(p + s * stride + d) * f;
        }
        float r = acc / L;
        size_t i = ((size_t)b * heads + h) * head_dim + d;
        if (att_bf16) att_bf16[i] = to_bf(r); else att[i] = r;
    }
}

// Decode attention for a few sequences (batch < 8), split over the context, with this step's RoPE and cache write
// folded in (the kernel for many sequences, attn_split below, says how): block (kv head,
// split, b) handles keys [split·chunk, min((split+1)·chunk, pos+1)) for the GROUP query heads sharing that KV
// head, reading each K and V row once. head_dim = 32·DIMS. qkv (b, q_dim + 2 kv_dim) is the QKV projection
// as it left it: each block rotates its query heads itself, and the current key (rotated) and value come from
// qkv too, rounded to bf16 as the cache holds them; the block whose split holds the current position writes
// them into the cache row `pos` of `layer` (no other block reads that row this step). Writes the split's
// running max, sum and unnormalized output to part (b, heads, splits, head_dim + 2). grid (kv_heads, splits,
// b), block 128 (4 warps). Keys and values are bf16. With `stage` non-null (one sequence, its cache in host
// memory), rows before the current position are read from `stage`, a device copy laid out as the cache that
// `kv_stage` made during this step.
//
// Memory first: a row (head_dim bf16) is read as 16-byte vectors by LPK = head_dim/8 lanes, so one warp load
// covers KPI = 32/LPK keys, and each lane issues the loads of two such key sets (K and V) before using any; the
// first two before it waits on the kernel before it, so that they overlap that kernel's tail.
// Per key, the dot product is reduced over its LPK lanes only (log2 LPK shuffles per query head, not 5), and
// each lane keeps its own online softmax over the keys it saw; lanes, then warps, are merged at the end.
template <int GROUP, int DIMS>
__device__ __forceinline__ void attn_lanes_impl(const float* __restrict__ qkv, const Seq* __restrict__ seqs,
                                                const float* __restrict__ inv_freq, const bf16* __restrict__ stage,
                                                float* __restrict__ part, float* __restrict__ att,
                                                bf16* __restrict__ att_bf16, unsigned* __restrict__ counts,
                                                int layer, int kv_heads, int chunk, int splits, int window,
                                                float scale) {
    constexpr int head_dim = DIMS * 32;
    constexpr int LPK = head_dim / 8;  // lanes per key row, 8 bf16 (16 bytes) each
    constexpr int KPI = 32 / LPK;      // keys per warp load
    const int heads = kv_heads * GROUP;
    int kh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
    Seq s = seqs[b];
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int sub = lane % LPK, kg = lane / LPK;  // this lane's 8 dimensions, and which key of a warp load
    int n = s.pos + 1;
    int lo = window > 0 && n > window ? n - window : 0;
    int first, last;
    active_splits(s, chunk, window, first, last);
    if (split < first || split >= last) return;
    int start = max(split * chunk, lo), end = min((split + 1) * chunk, n);
    const size_t koff = (size_t)(layer * 2 + 0) * s.max_seq * kv_dim + kh * head_dim + sub * 8;
    const size_t voff = (size_t)(layer * 2 + 1) * s.max_seq * kv_dim + kh * head_dim + sub * 8;
    bf16* kcache = (bf16*)s.kv + koff;
    bf16* vcache = (bf16*)s.kv + voff;
    const bf16* kstage = stage ? stage + koff : kcache;
    const bf16* vstage = stage ? stage + voff : vcache;
    // This warp's first two key sets, before waiting on the kernel before (rows before pos were written by
    // earlier steps, or staged before this launch); row pos comes from qkv below.
    const int step = warps * KPI;  // keys between a warp's consecutive loads
    int j0 = start + warp * KPI;
    uint4 kr[2], vr[2];
#pragma unroll
    for (int u = 0; u < 2; u++) {
        int j = j0 + u * step + kg;
        kr[u] = vr[u] = uint4{0u, 0u, 0u, 0u};
        if (j < end && j != s.pos) {
            kr[u] = *(const uint4*)(kstage + (size_t)j * kv_dim);
            vr[u] = *(const uint4*)(vstage + (size_t)j * kv_dim);
        }
    }
    wait_prior();  // qkv belongs to the kernel before
    allow_next();

    // RoPE (rotate-half) of this lane's 8 dimensions: dimension d pairs with d ± head_dim/2 at angle index
    // d mod head_dim/2. A lane's 8 dimensions lie in one half (head_dim/2 is a multiple of 8).
    constexpr int half = head_dim / 2;
    const int d0 = sub * 8, i0 = d0 % half, partner = d0 < half ? d0 + half : d0 - half;
    const float sign = d0 < half ? -1.0f : 1.0f;  // first half: a·cos − b·sin; second: a·cos + b·sin
    float cs[8], sn[8];
#pragma unroll
    for (int e = 0; e < 8; e++) sincosf((float)s.pos * inv_freq[i0 + e], &sn[e], &cs[e]);
    float q[GROUP][8], o[GROUP][8], m[GROUP], l[GROUP];
    const float* qrow = qkv + (size_t)b * (q_dim + 2 * kv_dim);
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        const float* qh = qrow + (kh * GROUP + g) * head_dim;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            q[g][e] = (qh[d0 + e] * cs[e] + sign * qh[partner + e] * sn[e]) * scale;
            o[g][e] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    // This step's key (rotated) and value slice, packed as the cache stores them.
    uint4 kcur, vcur;
    {
        const float* kh_row = qrow + q_dim + kh * head_dim;
        const float* vh_row = qrow + q_dim + kv_dim + kh * head_dim;
        unsigned kp[4], vp[4];
#pragma unroll
        for (int w = 0; w < 4; w++) {
            int e = 2 * w;
            float k0 = kh_row[d0 + e] * cs[e] + sign * kh_row[partner + e] * sn[e];
            float k1 = kh_row[d0 + e + 1] * cs[e + 1] + sign * kh_row[partner + e + 1] * sn[e + 1];
            kp[w] = pack_bf2(k0, k1);
            vp[w] = pack_bf2(vh_row[d0 + e], vh_row[d0 + e + 1]);
        }
        kcur = uint4{kp[0], kp[1], kp[2], kp[3]};
        vcur = uint4{vp[0], vp[1], vp[2], vp[3]};
    }
    if (s.pos >= start && s.pos < end && warp == 0 && kg == 0) {
        *(uint4*)(kcache + (size_t)s.pos * kv_dim) = kcur;
        *(uint4*)(vcache + (size_t)s.pos * kv_dim) = vcur;
    }
    for (; j0 < end; j0 += 2 * step) {
        bool ok[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            int j = j0 + u * step + kg;
            ok[u] = j < end;
            if (j == s.pos) {
                kr[u] = kcur;
                vr[u] = vcur;
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const unsigned kw[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
            const unsigned vw[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
            float dot[GROUP];
#pragma unroll
            for (int g = 0; g < GROUP; g++) {
                dot[g] = 0.0f;
#pragma unroll
                for (int w = 0; w < 4; w++) dot[g] += q[g][2 * w] * bf_lo(kw[w]) + q[g][2 * w + 1] * bf_hi(kw[w]);
            }
            // Sum over the key's LPK lanes; the GROUP reductions interleave, so their shuffles overlap.
#pragma unroll
            for (int off = LPK / 2; off > 0; off >>= 1) {
#pragma unroll
                for (int g = 0; g < GROUP; g++) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
            }
            if (ok[u]) {
#pragma unroll
                for (int g = 0; g < GROUP; g++) {
                    float mn = fmaxf(m[g], dot[g]);
                    float corr = __expf(m[g] - mn), p = __expf(dot[g] - mn);
                    l[g] = l[g] * corr + p;
#pragma unroll
                    for (int w = 0; w < 4; w++) {
                        o[g][2 * w] = o[g][2 * w] * corr + p * bf_lo(vw[w]);
                        o[g][2 * w + 1] = o[g][2 * w + 1] * corr + p * bf_hi(vw[w]);
                    }
                    m[g] = mn;
                }
            }
        }
        // The warp's next two key sets.
        if (j0 + 2 * step < end) {
#pragma unroll
            for (int u = 0; u < 2; u++) {
                int j = j0 + 2 * step + u * step + kg;
                kr[u] = vr[u] = uint4{0u, 0u, 0u, 0u};
                if (j < end && j != s.pos) {
                    kr[u] = *(const uint4*)(kstage + (size_t)j * kv_dim);
                    vr[u] = *(const uint4*)(vstage + (size_t)j * kv_dim);
                }
            }
        }
    }
    // Merge the KPI key lanes of each dimension slice within the warp (lanes `sub`, `sub + LPK`, ...).
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float mo = __shfl_xor_sync(0xffffffffu, m[g], off), lo2 = __shfl_xor_sync(0xffffffffu, l[g], off);
            float M = fmaxf(m[g], mo);
            float fs = M == -INFINITY ? 0.0f : __expf(m[g] - M), fo = M == -INFINITY ? 0.0f : __expf(mo - M);
            l[g] = l[g] * fs + lo2 * fo;
#pragma unroll
            for (int d = 0; d < 8; d++) o[g][d] = o[g][d] * fs + __shfl_xor_sync(0xffffffffu, o[g][d], off) * fo;
            m[g] = M;
        }
    }
    // Merge the warps of the block through shared memory: (warps, GROUP, head_dim + 2).
    extern __shared__ float sh[];
    const int stride = head_dim + 2;
    if (kg == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float* w = sh + (warp * GROUP + g) * stride;
#pragma unroll
            for (int d = 0; d < 8; d++) w[sub * 8 + d] = o[g][d];
            if (sub == 0) {
                w[head_dim] = m[g];
                w[head_dim + 1] = l[g];
            }
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
    finish_splits<GROUP>(part, att, att_bf16, counts, b, kh, kv_heads, head_dim, splits, first, last);
}

// Decode attention for many sequences (batch ≥ 8), split over the context, with this step's RoPE and cache
// write folded in: block (kv head, split, b) handles keys [split·chunk, min((split+1)·chunk, pos+1)) for the
// GROUP query heads sharing that KV head, reading each K and V row once. head_dim = 32·DIMS. qkv (b, q_dim + 2
// kv_dim) is the QKV projection as it left it: each block rotates its query heads itself, and the block whose
// split holds the current position rotates this step's key and writes it and the value into the cache row `pos`
// of `layer` (no other block reads that row this step). Its split's partial result goes to part, the last split
// to finish merges them (finish_splits). grid (kv_heads, splits, b), block ATTN_THREADS, dynamic shared memory
// as `attn_split_shared` in cuda/mod.rs sizes it. Keys and values are bf16. With `stage` non-null (one
// sequence, its cache in host memory), rows before the current position are read from `stage`, a device copy
// laid out as the cache that `kv_stage` made during this step.
//
// Bytes first. A split streams through tiles of ATTN_TILE keys in a ring of ATTN_STAGES shared-memory stages
// filled by coalesced cp.async (head_dim/8 consecutive threads per row), so that while a tile is computed the
// next ATTN_STAGES − 1 are in flight: the memory system never waits on the arithmetic (measured before this
// design: a block that fetched its whole split and then computed kept an H100 at ~40 % of its bandwidth, since
// the blocks of an SM fetched together and then computed together). The first tiles are requested before the
// kernel waits on the one before it (rows before `pos` were written by earlier steps, or staged before this
// launch), so they overlap that kernel's tail. Per tile, with an online softmax across tiles:
//   1. scores: two threads per key, each half of its K row (from the ring, or this step's key from shared
//      memory) against the GROUP query heads (shared memory, broadcast reads), summed by one shuffle;
//   2. per query head (a warp each): the tile's max, the running max and sum, exponentials in place (base 2,
//      log2 e folded into q) and the factor by which earlier tiles' sums shrink;
//   3. values: each warp a quarter of the tile's keys, each lane DIMS dimensions of every query head, its
//      running output rescaled by that factor first; warps are summed once, after the last tile.
// K rows sit 16 bytes apart beyond their length so that phase 1's row-per-pair reads do not conflict on banks;
// the two halves of a query row sit 4 floats apart for the same reason.
#define ATTN_THREADS 128
#define ATTN_TILE 64
#define ATTN_STAGES 3
template <int GROUP, int DIMS>
__device__ __forceinline__ void attn_split_impl(const float* __restrict__ qkv, const Seq* __restrict__ seqs,
                                                const float* __restrict__ inv_freq, const bf16* __restrict__ stage,
                                                float* __restrict__ part, float* __restrict__ att,
                                                bf16* __restrict__ att_bf16, unsigned* __restrict__ counts,
                                                int layer, int kv_heads, int chunk, int splits, int window,
                                                float scale) {
    constexpr int head_dim = DIMS * 32, half = head_dim / 2;
    constexpr int LPK = head_dim / 8;           // 16-byte vectors per row
    constexpr int HALF_VECS = LPK / 2;          // per half row, phase 1
    constexpr int KROW = LPK + 1;               // K row stride in the ring, 16-byte units
    constexpr int QHALF = half + 4;             // query row: two halves QHALF floats apart
    constexpr int WARPS = ATTN_THREADS / 32;
    constexpr int KEYS_PER_WARP = ATTN_TILE / WARPS;  // phase 3
    constexpr int STAGE_VECS = ATTN_TILE * (KROW + LPK);
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
    static_assert(ATTN_TILE == 64 && ATTN_THREADS == 2 * ATTN_TILE, "phase 2 reads two keys a lane");
    const int heads = kv_heads * GROUP;
    int kh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
    Seq s = seqs[b];  // the step records: copied to the device by the step's first node, before any kernel
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int n = s.pos + 1;
    int lo = window > 0 && n > window ? n - window : 0;
    int first, last;
    active_splits(s, chunk, window, first, last);
    if (split < first || split >= last) {
        wait_prior();
        allow_next();
        return;
    }
    int start = max(split * chunk, lo), end = min((split + 1) * chunk, n);
    int tiles = (end - start + ATTN_TILE - 1) / ATTN_TILE;

    // Shared memory: the ring, this step's key and value (16-byte aligned), then the floats.
    extern __shared__ uint4 ring[];                     // (ATTN_STAGES, {K (TILE, KROW), V (TILE, LPK)}) uint4
    bf16* newk = (bf16*)(ring + ATTN_STAGES * STAGE_VECS);  // (head_dim) this step's rotated key
    bf16* newv = newk + head_dim;                       // (head_dim) its value
    float* qs = (float*)(newv + head_dim);              // (GROUP, 2 · QHALF) rotated q · scale · log2 e
    float* ps = qs + GROUP * 2 * QHALF;                 // (TILE, GROUP) scores, then exponentials
    float* mrun = ps + ATTN_TILE * GROUP;               // (GROUP) running max
    float* lrun = mrun + GROUP;                         // (GROUP) running sum
    float* shrink = lrun + GROUP;                       // (GROUP) this tile's factor on earlier sums
    float* cs = shrink + GROUP;                         // (half) cos of this position's angles
    float* sn = cs + half;                              // (half) sin
    float* red = (float*)ring;                          // after the last tile: (WARPS, GROUP, head_dim)

    const float* qrow = qkv + (size_t)b * (q_dim + 2 * kv_dim);
    const size_t koff = (size_t)(layer * 2 + 0) * s.max_seq * kv_dim + kh * head_dim;
    const size_t voff = (size_t)(layer * 2 + 1) * s.max_seq * kv_dim + kh * head_dim;
    bf16* kcache = (bf16*)s.kv + koff;
    bf16* vcache = (bf16*)s.kv + voff;
    const bf16* kstage = stage ? stage + koff : kcache;
    const bf16* vstage = stage ? stage + voff : vcache;

    // Tile t's K and V rows before pos into ring stage `slot`; row pos comes from qkv.
    auto fetch = [&](int t, int slot) {
        uint4* kt = ring + slot * STAGE_VECS;
        uint4* vt = kt + ATTN_TILE * KROW;
        int base = start + t * ATTN_TILE, rows = min(ATTN_TILE, end - base);
        for (int i = tid; i < rows * LPK; i += ATTN_THREADS) {
            int r = i / LPK, v = i % LPK, j = base + r;
            if (j != s.pos) {
                cp_async16(kt + r * KROW + v, (const uint4*)(kstage + (size_t)j * kv_dim) + v, true);
                cp_async16(vt + r * LPK + v, (const uint4*)(vstage + (size_t)j * kv_dim) + v, true);
            }
        }
    };
#pragma unroll
    for (int t = 0; t < ATTN_STAGES - 1; t++) {
        if (t < tiles) fetch(t, t);
        cp_async_commit();
    }
    wait_prior();  // qkv belongs to the kernel before
    allow_next();

    // RoPE angles; rotated queries; this step's key and value into the cache and shared memory (one block).
    for (int i = tid; i < half; i += ATTN_THREADS) sincosf((float)s.pos * inv_freq[i], &sn[i], &cs[i]);
    if (tid < GROUP) {
        mrun[tid] = -INFINITY;
        lrun[tid] = 0.0f;
    }
    __syncthreads();
    for (int idx = tid; idx < GROUP * head_dim; idx += ATTN_THREADS) {
        int g = idx / head_dim, d = idx % head_dim, i = d % half;
        const float* qh = qrow + (kh * GROUP + g) * head_dim;
        float r = d < half ? qh[d] * cs[i] - qh[d + half] * sn[i] : qh[d] * cs[i] + qh[d - half] * sn[i];
        qs[g * 2 * QHALF + (d / half) * QHALF + i] = r * scale * LOG2E;
    }
    if (s.pos >= start && s.pos < end) {
        const float* kr = qrow + q_dim + kh * head_dim;
        const float* vr = qrow + q_dim + kv_dim + kh * head_dim;
        for (int d = tid; d < head_dim; d += ATTN_THREADS) {
            int i = d % half;
            float r = d < half ? kr[d] * cs[i] - kr[d + half] * sn[i] : kr[d] * cs[i] + kr[d - half] * sn[i];
            bf16 k = to_bf(r), v = to_bf(vr[d]);
            kcache[(size_t)s.pos * kv_dim + d] = k;
            vcache[(size_t)s.pos * kv_dim + d] = v;
            newk[d] = k;
            newv[d] = v;
        }
    }

    float o[GROUP][DIMS];
#pragma unroll
    for (int g = 0; g < GROUP; g++)
#pragma unroll
        for (int e = 0; e < DIMS; e++) o[g][e] = 0.0f;
    const int pair = tid >> 1, hf = tid & 1;  // phase 1: this thread's key of the tile, and which half row
    for (int t = 0; t < tiles; t++) {
        cp_async_wait<ATTN_STAGES - 2>();  // this thread's copies of tile t
        __syncthreads();  // everyone's; and the stage refilled below is no longer read (tile t − 1 is done)
        if (t + ATTN_STAGES - 1 < tiles) fetch(t + ATTN_STAGES - 1, (t + ATTN_STAGES - 1) % ATTN_STAGES);
        cp_async_commit();
        const uint4* kt = ring + (t % ATTN_STAGES) * STAGE_VECS;
        const uint4* vt = kt + ATTN_TILE * KROW;
        int base = start + t * ATTN_TILE, rows = min(ATTN_TILE, end - base);

        // Phase 1: scores.
        {
            int j = base + pair;
            float dot[GROUP];
#pragma unroll
            for (int g = 0; g < GROUP; g++) dot[g] = 0.0f;
            if (pair < rows) {
                const uint4* row = (j == s.pos ? (const uint4*)newk : kt + pair * KROW) + hf * HALF_VECS;
#pragma unroll
                for (int v = 0; v < HALF_VECS; v++) {
                    const uint4 k4 = row[v];
                    const unsigned w[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
                    for (int g = 0; g < GROUP; g++) {
                        const float4* q4 = (const float4*)(qs + g * 2 * QHALF + hf * QHALF + v * 8);
                        const float4 qa = q4[0], qb = q4[1];
                        dot[g] += qa.x * bf_lo(w[0]) + qa.y * bf_hi(w[0]) + qa.z * bf_lo(w[1]) +
                                  qa.w * bf_hi(w[1]) + qb.x * bf_lo(w[2]) + qb.y * bf_hi(w[2]) +
                                  qb.z * bf_lo(w[3]) + qb.w * bf_hi(w[3]);
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < GROUP; g++) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], 1);
#pragma unroll
            for (int g = 0; g < GROUP; g++)  // the pair's two threads write alternate heads
                if ((g & 1) == hf) ps[pair * GROUP + g] = pair < rows ? dot[g] : -INFINITY;
        }
        __syncthreads();

        // Phase 2: per query head, the online softmax's step over this tile.
        for (int g = warp; g < GROUP; g += WARPS) {
            float a = ps[lane * GROUP + g], c = ps[(lane + 32) * GROUP + g];
            float mt = warp_max(fmaxf(a, c));  // finite: a tile holds at least one key
            float mo = mrun[g], mn = fmaxf(mo, mt);
            a = exp2f(a - mn);
            c = exp2f(c - mn);
            ps[lane * GROUP + g] = a;
            ps[(lane + 32) * GROUP + g] = c;
            float lt = warp_sum(a + c);
            if (lane == 0) {
                float f = exp2f(mo - mn);  // 0 at the first tile (mo = −∞)
                shrink[g] = f;
                lrun[g] = lrun[g] * f + lt;
                mrun[g] = mn;
            }
        }
        __syncthreads();

        // Phase 3: values.
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float f = shrink[g];
#pragma unroll
            for (int e = 0; e < DIMS; e++) o[g][e] *= f;
        }
        int k0 = warp * KEYS_PER_WARP, k1 = min(k0 + KEYS_PER_WARP, rows);
        for (int kk = k0; kk < k1; kk++) {
            const bf16* vrow = base + kk == s.pos ? newv : (const bf16*)(vt + kk * LPK);
            float v[DIMS];
            if constexpr (DIMS == 1) {
                v[0] = bf(vrow[lane]);
            } else if constexpr (DIMS == 2) {
                unsigned w = ((const unsigned*)vrow)[lane];
                v[0] = bf_lo(w);
                v[1] = bf_hi(w);
            } else {
                uint2 w = ((const uint2*)vrow)[lane];
                v[0] = bf_lo(w.x);
                v[1] = bf_hi(w.x);
                v[2] = bf_lo(w.y);
                v[3] = bf_hi(w.y);
            }
            float p[GROUP];
#pragma unroll
            for (int g = 0; g < GROUP; g++) p[g] = ps[kk * GROUP + g];
#pragma unroll
            for (int g = 0; g < GROUP; g++)
#pragma unroll
                for (int e = 0; e < DIMS; e++) o[g][e] += p[g] * v[e];
        }
    }
    cp_async_wait<0>();  // the ring's last (empty) groups, before `red` reuses it
    __syncthreads();
#pragma unroll
    for (int g = 0; g < GROUP; g++)
#pragma unroll
        for (int e = 0; e < DIMS; e++) red[(warp * GROUP + g) * head_dim + lane * DIMS + e] = o[g][e];
    __syncthreads();
    const int stride = head_dim + 2;
    for (int idx = tid; idx < GROUP * head_dim; idx += ATTN_THREADS) {
        int g = idx / head_dim, d = idx % head_dim;
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) acc += red[(w * GROUP + g) * head_dim + d];
        float* dst = part + (((size_t)b * heads + kh * GROUP + g) * splits + split) * stride;
        dst[d] = acc;
        if (d == 0) {
            // Natural-log units, as attn_lanes writes them.
            dst[head_dim] = mrun[g] * LN2;
            dst[head_dim + 1] = lrun[g];
        }
    }
    finish_splits<GROUP>(part, att, att_bf16, counts, b, kh, kv_heads, head_dim, splits, first, last);
}

// The kernels attn_{lanes,split}_g{GROUP}_d{head_dim / 32}, for groups 1, 2, 4, 8 and head widths 32, 64, 128.
#define ATTN_KERNEL(KIND, G, D)                                                                                  \
    extern "C" __global__ void attn_##KIND##_g##G##_d##D(                                                       \
        const float* __restrict__ qkv, const Seq* __restrict__ seqs, const float* __restrict__ inv_freq,        \
        const bf16* __restrict__ stage, float* __restrict__ part, float* __restrict__ att,                      \
        bf16* __restrict__ att_bf16, unsigned* __restrict__ counts, int layer, int kv_heads, int chunk,         \
        int splits, int window, float scale) {                                                                  \
        attn_##KIND##_impl<G, D>(qkv, seqs, inv_freq, stage, part, att, att_bf16, counts, layer, kv_heads,      \
                                 chunk, splits, window, scale);                                                 \
    }
#define ATTN_KERNELS(KIND)                                                                                      \
    ATTN_KERNEL(KIND, 1, 1) ATTN_KERNEL(KIND, 1, 2) ATTN_KERNEL(KIND, 1, 4)                                     \
    ATTN_KERNEL(KIND, 2, 1) ATTN_KERNEL(KIND, 2, 2) ATTN_KERNEL(KIND, 2, 4)                                     \
    ATTN_KERNEL(KIND, 4, 1) ATTN_KERNEL(KIND, 4, 2) ATTN_KERNEL(KIND, 4, 4)                                     \
    ATTN_KERNEL(KIND, 8, 1) ATTN_KERNEL(KIND, 8, 2) ATTN_KERNEL(KIND, 8, 4)
ATTN_KERNELS(lanes)
ATTN_KERNELS(split)

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
