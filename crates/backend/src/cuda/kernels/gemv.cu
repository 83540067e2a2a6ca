// Matrix-vector products for batch-1 decode: each warp streams weight rows against an activation vector staged
// (RMS-normalized when asked) in shared memory.

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

