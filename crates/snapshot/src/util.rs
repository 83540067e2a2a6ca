//! Small helpers shared by both formats.

use std::borrow::Cow;
use std::fs::File;
use std::io;

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// True for exactly 64 lowercase hex digits (a 32-byte digest as this crate writes it: SHA-256 module digests, BLAKE3 checksums).
pub(crate) fn is_digest_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a canonical unsigned decimal: ASCII digits only, no sign, no leading zero (except `"0"` itself).
pub(crate) fn parse_canonical_u64(s: &str) -> Option<u64> {
    let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

/// The little-endian bytes of 4-byte plain values: borrowed on little-endian targets, converted otherwise.
pub(crate) fn le_bytes_u32(v: &[u32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// Fills `buf` from `file` at byte `offset`, without moving any shared cursor (so threads can read one file
/// at once).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(file, &mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_decimal() {
        assert_eq!(parse_canonical_u64("0"), Some(0));
        assert_eq!(parse_canonical_u64("42"), Some(42));
        assert_eq!(parse_canonical_u64("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "00", "042", "+1", "-1", " 1", "1 ", "1e3", "18446744073709551616", "٣"] {
            assert_eq!(parse_canonical_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hex_digest() {
        assert_eq!(hex(&[0x00, 0x1a, 0xff]), "001aff");
        assert!(is_digest_hex(&"ab".repeat(32)));
        assert!(!is_digest_hex(&"AB".repeat(32)));
        assert!(!is_digest_hex(&"ab".repeat(31)));
        assert!(!is_digest_hex(&"gg".repeat(32)));
    }
}
