// Driftwood's CUDA kernels, compiled at run time with NVRTC (no CUDA headers needed). The kernel sources are
// concatenated in this order: common.cuh, elementwise.cu, gemv.cu, attn_decode.cu, attn_prefill.cu
// (`cuda/mod.rs`).
//
// Conventions: activations are f32 (bf16 where they only feed a matrix product), weights bf16 (stored as raw
// `unsigned short`), row-major. The KV cache of a sequence lives in its actor's memory, bf16, with layout
// (layer, {k, v}, max_seq, kv_dim); kernels find it through the per-sequence `Seq` records of a decode step or
// the parameters of a prefill.

typedef unsigned short bf16;
typedef unsigned long long u64;

#define INFINITY __int_as_float(0x7f800000)

// Mirrors `SeqStep` in cuda/mod.rs (repr(C), 32 bytes).
struct Seq {
    u64 kv;        // device address of the sequence's KV cache (bf16)
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
// Two floats as one bf16x2 word, `lo` in the low half (round to nearest even).
__device__ __forceinline__ unsigned pack_bf2(float lo, float hi) {
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
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

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes global → shared, asynchronously; `valid` false zero-fills instead (no bytes read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
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
