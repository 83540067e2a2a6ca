//! The element types of weights and KV caches, and SIMD helpers shared by the CPU kernels.

use half::{bf16, f16};

/// A stored element type of weights or of a KV cache, widened to f32 for arithmetic.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Which type this is, for kernels that branch on it at compile time.
    const KIND: Kind;
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    /// Zero, for padding tails.
    const ZERO: Self;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
}

#[derive(Clone, Copy, PartialEq, Eq)]
/// The element types [`Elem`] covers.
pub(crate) enum Kind {
    F32,
    BF16,
    F16,
}

impl Elem for f32 {
    const KIND: Kind = Kind::F32;
    const ZERO: Self = 0.0;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    const KIND: Kind = Kind::BF16;
    const ZERO: Self = bf16::ZERO;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Elem for f16 {
    const KIND: Kind = Kind::F16;
    const ZERO: Self = f16::ZERO;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// AVX-512 helpers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{Elem, Kind};

    /// 16 weights at `p`, widened to f32.
    ///
    /// # Safety
    ///
    /// AVX-512F is available and 16 elements are readable at `p` (no alignment needed beyond `E`'s).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn load16<E: Elem>(p: *const E) -> __m512 {
        // SAFETY: the caller's contract; unaligned loads.
        unsafe {
            match E::KIND {
                Kind::F32 => _mm512_loadu_ps(p.cast()),
                // bf16 is the top half of an f32: widen to 32 bits, shift into place.
                Kind::BF16 => {
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
                }
                Kind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            }
        }
    }

    /// The lane sums of `a`, `b`, `c`, `d`, in that order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] partial sums.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let abcd =
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
        // Sum the four 128-bit lanes.
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd)));
        let s = _mm256_add_ps(_mm512_castps512_ps256(abcd), hi);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }

    /// `exp(x)` lane-wise for `x ≤ 0` (scores minus their maximum), to about 2 ulp: `2^(x·log₂e)` split into
    /// an integer power (applied by `scalef`) and a fraction in [−½, ½] whose power of two is a degree-6
    /// Taylor polynomial (its remainder is below 1.2e-7 relative). Inputs below −87 give about 1e-38, not 0.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn exp_neg(x: __m512) -> __m512 {
        const C: [f32; 6] = [
            std::f32::consts::LN_2,
            0.240_226_5,     // ln² 2 / 2
            0.055_504_11,    // ln³ 2 / 6
            0.009_618_129,   // ln⁴ 2 / 24
            0.001_333_355_8, // ln⁵ 2 / 120
            0.000_154_035_3, // ln⁶ 2 / 720
        ];
        let t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(C[5]);
        for &c in C[..5].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(p, n)
    }
}
