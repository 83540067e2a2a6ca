//! Resident-set size of this process, for measuring what sharing or copying memory really costs.

/// Returns this process's resident set size in bytes, or `None` where the platform does not report it.
///
/// On Linux this reads `/proc/self/statm` (resident pages × page size), which is cheap enough to call
/// around a single operation.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * crate::page_size() as u64)
}
