// Embedding, normalization, RoPE with the cache write, activations: one pass over their rows each.

// x (b, hidden) = table[seqs[b].token]. grid (b), block any.
extern "C" __global__ void embed(const bf16* __restrict__ table, const Seq* __restrict__ seqs, float* __restrict__ x,
                                 int hidden) {
    wait_prior();
    allow_next();
    int b = blockIdx.x;
    const bf16* row = table + (size_t)seqs[b].token * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(size_t)b * hidden + i] = bf(row[i]);
}

// x (t, hidden) = table[tokens[t]]: a prefill chunk's tokens (checked against the vocabulary by the host).
// grid (t), block any.
extern "C" __global__ void embed_tokens(const bf16* __restrict__ table, const unsigned* __restrict__ tokens,
                                        float* __restrict__ x, int hidden) {
    wait_prior();
    allow_next();
    int r = blockIdx.x;
    const bf16* row = table + (size_t)tokens[r] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(size_t)r * hidden + i] = bf(row[i]);
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

// RoPE for a prefill chunk of one sequence, whose row r is position pos0 + r. From qkv (t, q_dim + 2 kv_dim) f32:
// q rotated and multiplied by `qscale` (the softmax scale times log2 e, so attention can use exp2) into
// q_out (t, heads, head_dim) bf16; k rotated and v into this chunk's device copies knew, vnew (t, kv_dim) bf16
// and into the sequence's cache rows pos0 + r of `layer`. grid (t), block 128.
extern "C" __global__ void rope_prefill(const float* __restrict__ qkv, const float* __restrict__ inv_freq,
                                        bf16* __restrict__ q_out, bf16* __restrict__ knew, bf16* __restrict__ vnew,
                                        bf16* __restrict__ cache, int layer, int pos0, int max_seq, int heads,
                                        int kv_heads, int head_dim, float qscale) {
    wait_prior();
    allow_next();
    int r = blockIdx.x, pos = pos0 + r;
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim, half = head_dim / 2;
    const float* row = qkv + (size_t)r * (q_dim + 2 * kv_dim);
    bf16* kc = cache + ((size_t)(layer * 2 + 0) * max_seq + pos) * kv_dim;
    bf16* vc = cache + ((size_t)(layer * 2 + 1) * max_seq + pos) * kv_dim;
    bf16* kn = knew + (size_t)r * kv_dim;
    bf16* vn = vnew + (size_t)r * kv_dim;
    bf16* qo = q_out + (size_t)r * q_dim;
    int pairs = (heads + kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int h = p / half, i = p % half;
        float sn, cs;
        sincosf((float)pos * inv_freq[i], &sn, &cs);
        if (h < heads) {
            const float* q = row + h * head_dim;
            float a = q[i], c = q[i + half];
            qo[h * head_dim + i] = to_bf((a * cs - c * sn) * qscale);
            qo[h * head_dim + i + half] = to_bf((c * cs + a * sn) * qscale);
        } else {
            int kh = h - heads;
            const float* k = row + q_dim + kh * head_dim;
            float a = k[i], c = k[i + half];
            bf16 k0 = to_bf(a * cs - c * sn), k1 = to_bf(c * cs + a * sn);
            kn[kh * head_dim + i] = k0;
            kn[kh * head_dim + i + half] = k1;
            kc[kh * head_dim + i] = k0;
            kc[kh * head_dim + i + half] = k1;
        }
    }
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        bf16 v = to_bf(row[q_dim + kv_dim + i]);
        vn[i] = v;
        vc[i] = v;
    }
}

// act (b, ff) bf16 = silu(gate) * up, from gu (b, 2 ff) f32 whose row is [gate (ff) | up (ff)] (one GEMM over
// the stacked gate and up weights).
extern "C" __global__ void swiglu_bf16(const float* __restrict__ gu, bf16* __restrict__ act, int b, int ff) {
    wait_prior();
    allow_next();
    size_t total = (size_t)b * ff;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / ff, c = i % ff;
        float g = gu[r * 2 * ff + c], u = gu[r * 2 * ff + ff + c];
        act[i] = to_bf(g / (1.0f + expf(-g)) * u);
    }
}

// act (t, ff) bf16 = silu(gate) * up, from gu (t, 2 ff) bf16 whose row is [gate (ff) | up (ff)] (one GEMM over
// the stacked gate and up weights). Eight elements per thread and step (ff a multiple of 8).
extern "C" __global__ void swiglu_pairs_bf16(const bf16* __restrict__ gu, bf16* __restrict__ act, int t, int ff) {
    wait_prior();
    allow_next();
    int per_row = ff / 8;
    size_t total = (size_t)t * per_row;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / per_row, c = i % per_row;
        uint4 g = *(const uint4*)(gu + r * 2 * ff + c * 8);
        uint4 u = *(const uint4*)(gu + r * 2 * ff + ff + c * 8);
        unsigned gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w}, out[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float g0 = bf_lo(gw[j]), g1 = bf_hi(gw[j]);
            float a0 = g0 / (1.0f + expf(-g0)) * bf_lo(uw[j]);
            float a1 = g1 / (1.0f + expf(-g1)) * bf_hi(uw[j]);
            out[j] = pack_bf2(a0, a1);
        }
        *(uint4*)(act + r * ff + c * 8) = make_uint4(out[0], out[1], out[2], out[3]);
    }
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
