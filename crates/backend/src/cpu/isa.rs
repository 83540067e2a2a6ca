//! The instruction sets the CPU kernels are compiled for, detected at run time.
//!
//! Every kernel has a portable path and, on x86-64, AVX2 and AVX-512 paths. [`Isa::best`] picks the widest
//! this CPU runs, for compute-bound kernels; [`Isa::streaming`] the one for kernels that stream memory (decode's
//! matrix-vector products). `DRIFTWOOD_CPU_ISA=scalar|avx2|avx512` sets both (to measure or test a path on
//! a machine whose default is another); a path the CPU lacks is never chosen.

use std::sync::OnceLock;

/// An instruction set the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Portable Rust (whatever the compiler vectorizes for the build target).
    Scalar,
    /// AVX2 with FMA and F16C (x86-64 only).
    Avx2,
    /// AVX-512F (x86-64 only).
    Avx512,
}

impl Isa {
    /// Every instruction set, slowest first.
    pub(crate) const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU runs the path.
    pub(crate) fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The widest path this CPU runs, or the one `DRIFTWOOD_CPU_ISA` names (read once per process; capped by
    /// what the CPU runs).
    pub(crate) fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::widest(Isa::forced().unwrap_or(Isa::Avx512)))
    }

    /// The path for kernels that stream memory, such as decode's matrix-vector products: [`best`](Self::best),
    /// except on AMD CPUs without `DRIFTWOOD_CPU_ISA`, where it is at most AVX2. AMD's Zen 4 runs a 512-bit
    /// instruction as two 256-bit halves; streaming bf16 weights of SmolLM2-135M's shapes from a mapped file on
    /// two threads, its AVX2 kernel read 30–34 GB/s and its AVX-512 kernel 19–27 GB/s, interleaved in one run
    /// (an EPYC with `avx512_bf16`; the compute-bound prefill tiles keep AVX-512).
    pub(crate) fn streaming() -> Isa {
        static STREAMING: OnceLock<Isa> = OnceLock::new();
        *STREAMING.get_or_init(|| match Isa::forced() {
            Some(isa) => Isa::widest(isa),
            None if amd() => Isa::widest(Isa::Avx2),
            None => Isa::best(),
        })
    }

    /// The path `DRIFTWOOD_CPU_ISA` names, if it is set to one.
    fn forced() -> Option<Isa> {
        std::env::var("DRIFTWOOD_CPU_ISA").ok().and_then(|v| Isa::parse(&v))
    }

    /// The widest path this CPU runs, up to `cap`.
    fn widest(cap: Isa) -> Isa {
        Isa::ALL.into_iter().rev().find(|isa| *isa <= cap && isa.available()).unwrap_or(Isa::Scalar)
    }

    /// The path named `name` (`scalar`, `avx2` or `avx512`, any case), if it is one.
    pub(crate) fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// The path's name, as [`parse`](Self::parse) reads it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Whether the CPU's vendor is AMD (`AuthenticAMD`).
fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0); // leaf 0: the vendor string
        let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::Isa;

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::ALL.windows(2).all(|w| w[0] < w[1]), "ALL is slowest first");
    }

    #[test]
    fn chosen_paths_run_here() {
        assert!(Isa::best().available() && Isa::streaming().available());
        assert!(Isa::streaming() <= Isa::best() || std::env::var_os("DRIFTWOOD_CPU_ISA").is_some());
    }
}
