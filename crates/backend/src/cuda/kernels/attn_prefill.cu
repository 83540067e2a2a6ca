// Causal grouped-query attention for a prefill chunk, flash-style: the t×t score matrix never leaves registers.
//
// A block takes BM query rows of one head (each of its warps 16 or 32 rows) and walks the keys it can see in
// tiles of BN = 64: S = Q·Kᵀ on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate), an online softmax in
// registers, O += P·V on the tensor cores. K and V tiles are double-buffered in shared memory with cp.async,
// so the next tile loads while this one is multiplied. The query block's rows are consecutive positions of one
// sequence: row r is position pos0 + r. Keys before pos0 (a cached prefix) come from the sequence's cache in its
// actor's memory; keys from pos0 on come from this chunk's device copies (`knew`, `vnew`), which `rope_prefill`
// wrote together with the cache rows, so a prompt on pinned memory is not read back across the bus.
//
// Work per block: (rows · visible keys) · head_dim · 4 FLOPs; bytes: each visible K and V row once per block.
// Blocks are issued longest first (the last query block sees the most keys).

#define PF_BN 64

// Mirrors `AttnPrefillParams` in cuda/mod.rs (repr(C), 72 bytes).
struct AttnPrefill {
    u64 q;        // (t, heads, head_dim) bf16: rotated queries times softmax scale · log2 e
    u64 cache;    // the sequence's KV cache, (layer, {k, v}, max_seq, kv_dim) bf16
    u64 knew;     // (t, kv_dim) bf16: this chunk's rotated keys (positions pos0..pos0 + t)
    u64 vnew;     // (t, kv_dim) bf16: this chunk's values
    u64 out;      // (t, heads · head_dim) bf16
    int t;        // query rows in the chunk
    int pos0;     // position of row 0 (tokens already in the cache)
    int max_seq;  // rows per (layer, k|v) of the cache
    int layer;
    int heads;
    int kv_heads;
    int window;   // sliding window (0: none): a query at p sees keys p - window + 1 ..= p
    int pad;
};


__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// 2^x with the special-function unit (inputs are ≤ 0 or -inf here; -inf gives 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// d (16×8 f32) += a (16×16 bf16, row) · b (16×8 bf16, col).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A (rows × HD) bf16 tile in shared memory: row-major, its 16-byte chunks XOR-swizzled by row so that the 8
// row addresses of one ldmatrix phase fall in different banks.
template <int HD>
__device__ __forceinline__ bf16* tile_at(bf16* tile, int row, int chunk) {
    constexpr int C = HD / 8, SW = C < 8 ? C - 1 : 7;
    return tile + row * HD + ((chunk ^ (row & SW)) * 8);
}

// MT: 16-row m-tiles per warp, WARPS warps per block, so BM = 16 · MT · WARPS query rows. Two m-tiles reuse
// each K and V fragment loaded from shared memory twice and give each warp two independent mma chains.
template <int HD, int MT, int WARPS>
__device__ __forceinline__ void attn_prefill_impl(const AttnPrefill& p) {
    constexpr int C = HD / 8;  // 16-byte chunks per row
    constexpr int BM = 16 * MT * WARPS;
    extern __shared__ __align__(128) unsigned char pf_smem[];
    bf16* sq = (bf16*)pf_smem;       // (BM, HD)
    bf16* sk = sq + BM * HD;         // 2 × (BN, HD)
    bf16* sv = sk + 2 * PF_BN * HD;  // 2 × (BN, HD)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tig = lane & 3;  // mma fragment coordinates
    const int mb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y;
    const int group = p.heads / p.kv_heads, kh = h / group;
    const int kv_dim = p.kv_heads * HD;
    const int q0 = mb * BM;
    const int rows = min(BM, p.t - q0);
    const int pmin = p.pos0 + q0, pmax = pmin + rows - 1;
    const int lo = p.window > 0 ? max(0, pmin - p.window + 1) : 0;
    const int kstart = lo / PF_BN * PF_BN, kend = pmax + 1;  // keys [kstart, kend) cover every row's view
    const int ntiles = (kend - kstart + PF_BN - 1) / PF_BN;

    const bf16* kc = (const bf16*)p.cache + (size_t)(p.layer * 2 + 0) * p.max_seq * kv_dim + kh * HD;
    const bf16* vc = (const bf16*)p.cache + (size_t)(p.layer * 2 + 1) * p.max_seq * kv_dim + kh * HD;
    const bf16* kn = (const bf16*)p.knew + kh * HD;
    const bf16* vn = (const bf16*)p.vnew + kh * HD;
    const bf16* qg = (const bf16*)p.q;

    wait_prior();
    allow_next();

    // Loads key/value tile `it` into buffer `buf`; rows past the last visible key are zero-filled.
    auto load_kv = [&](int it, int buf) {
        bf16* dk = sk + buf * PF_BN * HD;
        bf16* dv = sv + buf * PF_BN * HD;
        for (int i = tid; i < PF_BN * C; i += blockDim.x) {
            int r = i / C, c = i % C, j = kstart + it * PF_BN + r;
            bool valid = j < kend;
            size_t krow = j < p.pos0 ? (size_t)j : (size_t)(j - p.pos0);
            const bf16* ks = valid ? (j < p.pos0 ? kc : kn) + krow * kv_dim + c * 8 : kn;
            const bf16* vs = valid ? (j < p.pos0 ? vc : vn) + krow * kv_dim + c * 8 : vn;
            cp_async16(tile_at<HD>(dk, r, c), ks, valid);
            cp_async16(tile_at<HD>(dv, r, c), vs, valid);
        }
    };

    for (int i = tid; i < BM * C; i += blockDim.x) {
        int r = i / C, c = i % C;
        bool valid = r < rows;
        const bf16* src = valid ? qg + ((size_t)(q0 + r) * p.heads + h) * HD + c * 8 : qg;
        cp_async16(tile_at<HD>(sq, r, c), src, valid);
    }
    load_kv(0, 0);
    cp_async_commit();

    unsigned qf[MT][HD / 16][4];  // this warp's query rows as A fragments
    float o[MT][HD / 8][4];       // output accumulators: 16 rows × HD per m-tile
    float m[MT][2], l[MT][2];     // running max (log2 units) and sum of rows g and g + 8 of each m-tile
    int pr[MT][2];                // those rows' positions
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int d = 0; d < HD / 8; d++) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.0f;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            m[mt][e] = -INFINITY;
            l[mt][e] = 0.0f;
            pr[mt][e] = pmin + (warp * MT + mt) * 16 + g + 8 * e;
        }
    }

    for (int it = 0; it < ntiles; it++) {
        const int buf = it & 1;
        if (it + 1 < ntiles) load_kv(it + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();  // everything but the tile just requested has landed
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int ks = 0; ks < HD / 16; ks++) {
                    int mi = lane >> 3, row = (warp * MT + mt) * 16 + (lane & 7) + ((mi & 1) << 3);
                    ldmatrix_x4(qf[mt][ks], tile_at<HD>(sq, row, ks * 2 + (mi >> 1)));
                }
            }
        }
        const bf16* tk = sk + buf * PF_BN * HD;
        const bf16* tv = sv + buf * PF_BN * HD;

        // S (16 × BN per m-tile) = Q · Kᵀ.
        float s[MT][PF_BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < PF_BN / 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
            for (int np = 0; np < PF_BN / 16; np++) {
                unsigned b[4];
                int mi = lane >> 3;
                ldmatrix_x4(b, tile_at<HD>((bf16*)tk, np * 16 + (lane & 7) + ((mi >> 1) << 3), ks * 2 + (mi & 1)));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(s[mt][2 * np], qf[mt][ks], b[0], b[1]);
                    mma_bf16(s[mt][2 * np + 1], qf[mt][ks], b[2], b[3]);
                }
            }
        }

        // Mask what a row may not see: keys after its position, keys before its window. Only tiles that reach
        // past the block's first position or below its last row's window need it.
        const int kbase = kstart + it * PF_BN;
        const bool edge = kbase + PF_BN - 1 > pmin || (p.window > 0 && kbase < pmax - p.window + 1);
        if (edge) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < PF_BN / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int j = kbase + n * 8 + tig * 2 + (e & 1), q = pr[mt][e >> 1];
                        if (j > q || (p.window > 0 && j <= q - p.window)) s[mt][n][e] = -INFINITY;
                    }
        }

        // Online softmax over the tile (each row spread over the 4 threads of a quad), then O += P · V, where
        // the score accumulators are already laid out as the A fragments of P.
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float x = -INFINITY;
#pragma unroll
                for (int n = 0; n < PF_BN / 8; n++) x = fmaxf(x, fmaxf(s[mt][n][2 * e], s[mt][n][2 * e + 1]));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                const float mn = fmaxf(m[mt][e], x);
                // A row that has seen no key yet keeps max -inf: exponentiate against 0 so nothing becomes NaN.
                const float u = mn == -INFINITY ? 0.0f : mn;
                const float corr = fast_exp2(m[mt][e] - u);
                m[mt][e] = mn;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < PF_BN / 8; n++) {
                    s[mt][n][2 * e] = fast_exp2(s[mt][n][2 * e] - u);
                    s[mt][n][2 * e + 1] = fast_exp2(s[mt][n][2 * e + 1] - u);
                    sum += s[mt][n][2 * e] + s[mt][n][2 * e + 1];
                }
                l[mt][e] = l[mt][e] * corr + sum;
#pragma unroll
                for (int d = 0; d < HD / 8; d++) {
                    o[mt][d][2 * e] *= corr;
                    o[mt][d][2 * e + 1] *= corr;
                }
            }
        }
#pragma unroll
        for (int ks = 0; ks < PF_BN / 16; ks++) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                a[mt][0] = pack_bf2(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                a[mt][1] = pack_bf2(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                a[mt][2] = pack_bf2(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                a[mt][3] = pack_bf2(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                unsigned b[4];
                int mi = lane >> 3;
                ldmatrix_x4_trans(b, tile_at<HD>((bf16*)tv, ks * 16 + (lane & 7) + ((mi & 1) << 3), dp * 2 + (mi >> 1)));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(o[mt][2 * dp], a[mt], b[0], b[1]);
                    mma_bf16(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the next iteration loads into the buffer this one read
    }

    const size_t stride = (size_t)p.heads * HD;
    bf16* out = (bf16*)p.out + h * HD + tig * 2;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            float sum = l[mt][e];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            const int r = q0 + (warp * MT + mt) * 16 + g + 8 * e;
            if (r < p.t) {
#pragma unroll
                for (int d = 0; d < HD / 8; d++)
                    *(unsigned*)(out + r * stride + d * 8) = pack_bf2(o[mt][d][2 * e] * inv, o[mt][d][2 * e + 1] * inv);
            }
        }
    }
}

// grid (ceil(t / 128), heads), block 128 (4 warps), dynamic shared memory (128 + 4 · 64) · head_dim · 2 bytes;
// head dimension 128 keeps one m-tile per warp (two would not fit the registers): 64 rows per block.
#define ATTN_PREFILL(D, MT)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) attn_prefill_d##D(const AttnPrefill p) { \
        attn_prefill_impl<D, MT, 4>(p);                                                       \
    }
ATTN_PREFILL(32, 2) ATTN_PREFILL(64, 2) ATTN_PREFILL(128, 1)
