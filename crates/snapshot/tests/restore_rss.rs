//! Restoring an actor snapshot writes only its stored pages: a small file declaring a 4 GiB memory restores
//! into fresh (zero, unbacked) memory without making that memory resident. One test in its own binary, so
//! that no other test's allocations move this process's resident set while it is measured.

mod common;

use driftwood_snapshot::{ActorLimits, ActorReader};

const MIB: u64 = 1 << 20;

fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("resident pages");
    pages * 4096
}

#[test]
fn a_4_gib_memory_with_45_stored_pages_restores_with_bounded_resident_memory() {
    let size: usize = 4 << 30;
    // 45 non-zero pages spread over the whole memory (first and last included), in a file built per the
    // format's specification (scanning a 4 GiB memory to write it would dominate the test's time).
    let pages: Vec<usize> = (0..45).map(|i| i * (size / 4096 - 1) / 44).collect();
    let bytes = crafted(size as u64, &pages);
    assert!(bytes.len() < 200_000, "{} bytes", bytes.len());
    assert_eq!(
        driftwood_snapshot::parse_actor(bytes.clone(), &ActorLimits { max_memory: size as u64 }).unwrap().page_count(),
        45,
        "the crafted file is valid"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.actor");
    std::fs::write(&path, &bytes).unwrap();

    let limits = ActorLimits { max_memory: size as u64 };
    let reader = ActorReader::open(&path, &limits).unwrap();
    assert_eq!((reader.page_count(), reader.stored_bytes()), (45, 45 * 4096));
    let mut memory = vec![0u8; size]; // fresh: zero and unbacked
    let before = resident();
    reader.restore_into(&mut memory, 0).unwrap();
    let after = resident();
    eprintln!(
        "restore of a 4 GiB memory with 45 stored pages: resident +{:.2} MiB",
        (after.saturating_sub(before)) as f64 / MIB as f64
    );
    assert!(after.saturating_sub(before) < 64 * MIB, "resident memory grew by {} bytes", after - before);
    for (i, &p) in pages.iter().enumerate() {
        assert!(memory[p * 4096..(p + 1) * 4096].iter().all(|&b| b == i as u8 + 1), "page {p}");
    }

    // Below `zero_from` pages that are not stored are cleared; a corrupted file leaves no stored bytes behind.
    let mut dirty = vec![0u8; size];
    dirty[4096 * 3] = 9; // not a stored page, below zero_from
    let mut corrupt = bytes.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let bad = dir.path().join("bad.actor");
    std::fs::write(&bad, &corrupt).unwrap();
    ActorReader::open(&path, &limits).unwrap().restore_into(&mut dirty, 1 << 20).unwrap();
    assert_eq!(dirty[4096 * 3], 0);
    let err = ActorReader::open(&bad, &limits).unwrap().restore_into(&mut dirty, 0).unwrap_err();
    assert!(matches!(err, driftwood_snapshot::SnapshotError::Checksum { .. }), "{err:?}");
    assert!(pages.iter().all(|&p| dirty[p * 4096..(p + 1) * 4096].iter().all(|&b| b == 0)), "stored pages zeroed");
    assert!(resident().saturating_sub(before) < 64 * MIB);
}

/// An actor snapshot of a `memory_size`-byte memory storing `pages` (page `p` filled with the byte `i + 1` for
/// the `i`-th page), written per the format's specification.
fn crafted(memory_size: u64, pages: &[usize]) -> Vec<u8> {
    let json = serde_json::to_vec(&serde_json::json!({
        "module_digest": common::sha256_hex(b"(module)"),
        "abi_version": 1,
        "memory_size": memory_size,
        "page_size": 4096,
        "pages": pages.len(),
        "globals": [],
        "models": [],
        "metadata": {},
    }))
    .unwrap();
    let mut body = json.clone();
    for &p in pages {
        body.extend_from_slice(&(p as u32).to_le_bytes());
    }
    for i in 0..pages.len() {
        body.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    let mut out = driftwood_snapshot::actor::MAGIC.to_vec();
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}
