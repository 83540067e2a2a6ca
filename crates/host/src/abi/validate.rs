//! Validation of guest-supplied `(offset, count)` ranges: every check happens before any work.

use std::fmt;
use std::ops::Range;

/// A host call rejected its arguments. Becomes the guest's trap message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {detail}")]
pub struct AbiError {
    /// The import that rejected the call, e.g. `driftwood.matmul`.
    pub call: &'static str,
    /// What was wrong, naming the operand and its range.
    pub detail: String,
}

impl AbiError {
    pub(crate) fn new(call: &'static str, detail: String) -> Self {
        AbiError { call, detail }
    }
}

struct Span {
    offset: u64,
    bytes: u64,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:08x}..0x{:08x} ({} bytes)", self.offset, self.offset.saturating_add(self.bytes), self.bytes)
    }
}

/// Checks that `count` elements of `elem_size` bytes at guest `offset` lie within a `mem_len`-byte memory,
/// do not wrap the 32-bit address space, and start `elem_size`-aligned. Returns the byte range.
pub(crate) fn check_range(
    call: &'static str,
    operand: &str,
    offset: u32,
    count: u64,
    elem_size: usize,
    mem_len: usize,
) -> Result<Range<usize>, AbiError> {
    let fail = |detail: String| Err(AbiError::new(call, format!("operand `{operand}` {detail}")));
    let Some(bytes) = count.checked_mul(elem_size as u64) else {
        return fail(format!("at 0x{offset:08x}: {count} elements of {elem_size} bytes overflow a 64-bit size"));
    };
    let span = Span { offset: offset as u64, bytes };
    let end = match (offset as u64).checked_add(bytes) {
        Some(end) if end <= 1 << 32 => end,
        _ => return fail(format!("range {span} wraps past the end of the 32-bit address space")),
    };
    if end > mem_len as u64 {
        return fail(format!("range {span} is outside the actor's {mem_len}-byte memory"));
    }
    if !(offset as usize).is_multiple_of(elem_size) {
        return fail(format!(
            "range {span} is misaligned: elements of {elem_size} bytes need {elem_size}-byte alignment"
        ));
    }
    Ok(offset as usize..end as usize)
}

/// Checks that an output range shares no byte with an input range.
pub(crate) fn disjoint(
    call: &'static str,
    (out_name, out): (&str, &Range<usize>),
    (in_name, input): (&str, &Range<usize>),
) -> Result<(), AbiError> {
    let overlap = !out.is_empty() && !input.is_empty() && out.start < input.end && input.start < out.end;
    if overlap {
        return Err(AbiError::new(
            call,
            format!(
                "output `{out_name}` 0x{:08x}..0x{:08x} overlaps input `{in_name}` 0x{:08x}..0x{:08x}",
                out.start, out.end, input.start, input.end
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_in_bounds_aligned_ranges() {
        assert_eq!(check_range("t", "a", 8, 4, 4, 64), Ok(8..24));
        assert_eq!(check_range("t", "a", 64, 0, 4, 64), Ok(64..64));
    }

    #[test]
    fn rejects_out_of_bounds_with_the_range_in_the_message() {
        let e = check_range("driftwood.matmul", "b", 60, 2, 4, 64).unwrap_err();
        assert_eq!(e.call, "driftwood.matmul");
        assert!(e.detail.contains("operand `b`") && e.detail.contains("0x0000003c..0x00000044"), "{e}");
        assert!(e.detail.contains("outside the actor's 64-byte memory"), "{e}");
    }

    #[test]
    fn rejects_wrap_overflow_and_misalignment() {
        let e = check_range("t", "a", u32::MAX - 3, 2, 4, usize::MAX).unwrap_err();
        assert!(e.detail.contains("wraps past the end of the 32-bit address space"), "{e}");
        let e = check_range("t", "a", 0, u64::MAX / 2, 4, 1 << 20).unwrap_err();
        assert!(e.detail.contains("overflow"), "{e}");
        let e = check_range("t", "a", 2, 1, 4, 64).unwrap_err();
        assert!(e.detail.contains("misaligned"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 4096, failure_persistence: None, ..Default::default()
        })]

        /// Any arguments: an `Ok` range is exactly the asked bytes, inside memory and aligned; everything else
        /// is an error naming the call and operand. Never a panic.
        #[test]
        fn check_range_accepts_exactly_the_valid_ranges(
            offset in proptest::prelude::any::<u32>(),
            count in proptest::prop_oneof![0u64..1 << 20, proptest::prelude::any::<u64>()],
            elem_size in proptest::prop_oneof![proptest::sample::select(vec![1usize, 2, 4, 8]), 0usize..64],
            mem_len in proptest::prop_oneof![0usize..1 << 22, proptest::prelude::any::<usize>()],
        ) {
            let bytes = (count as u128) * (elem_size as u128);
            let end = offset as u128 + bytes;
            let valid = bytes <= u64::MAX as u128
                && end <= 1 << 32
                && end <= mem_len as u128
                && (offset as usize).is_multiple_of(elem_size);
            match check_range("driftwood.t", "x", offset, count, elem_size, mem_len) {
                Ok(r) => {
                    proptest::prop_assert!(valid);
                    proptest::prop_assert_eq!(r.start, offset as usize);
                    proptest::prop_assert_eq!(r.len() as u128, bytes);
                }
                Err(e) => {
                    proptest::prop_assert!(!valid, "{e}");
                    proptest::prop_assert_eq!(e.call, "driftwood.t");
                    proptest::prop_assert!(e.detail.starts_with("operand `x`"), "{e}");
                }
            }
        }

        /// `disjoint` refuses exactly the pairs of non-empty ranges that share a byte.
        #[test]
        fn disjoint_refuses_exactly_shared_bytes(a in 0usize..64, la in 0usize..32, b in 0usize..64, lb in 0usize..32) {
            let (out, input) = (a..a + la, b..b + lb);
            let shared = out.clone().any(|i| input.contains(&i));
            proptest::prop_assert_eq!(disjoint("t", ("o", &out), ("i", &input)).is_err(), shared);
        }
    }

    #[test]
    fn overlap_is_detected_only_for_shared_bytes() {
        assert!(disjoint("t", ("c", &(0..8)), ("a", &(8..16))).is_ok());
        assert!(disjoint("t", ("c", &(0..9)), ("a", &(8..16))).is_err());
        assert!(disjoint("t", ("c", &(8..8)), ("a", &(0..16))).is_ok());
    }
}
