//! The actor snapshot: round trips, restore, corruption and hostile files.

mod common;

use std::fs;

use common::{FailAfter, blake3_hex, dir_entries, sample_image, sparse_memory};
use driftwood_snapshot::actor::{FIXED_HEADER_BYTES, MAGIC};
use driftwood_snapshot::{
    ActorImage, ActorLimits, GlobalValue, MemoryOverlay, SnapshotError, parse_actor, read_actor, write_actor,
    write_actor_overlaid, write_actor_to, write_actor_to_overlaid, write_atomic,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LIMITS: ActorLimits = ActorLimits { max_memory: 1 << 30 };

fn bytes_of(image: &ActorImage, memory: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_actor_to(&mut out, image, memory).unwrap();
    out
}

fn restored(file: &driftwood_snapshot::ActorFile) -> Vec<u8> {
    // Start from garbage: restore must zero what is not stored.
    let mut memory = vec![0x5a; file.image.memory_size as usize];
    file.restore_into(&mut memory).unwrap();
    memory
}

#[test]
fn round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (size, one_in)) in
        [(0usize, 1u32), (65536, 1), (65536, 1_000_000), (16 * 65536, 7), (64 * 65536, 50)].into_iter().enumerate()
    {
        let memory = sparse_memory(i as u64, size, one_in);
        let image = sample_image(size as u64);
        let path = dir.path().join(format!("actor{i}.dwa"));
        let stats = write_actor(&path, &image, &memory).unwrap();
        let nonzero = memory.chunks_exact(4096).filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
        assert_eq!(stats.pages_total, size as u64 / 4096);
        assert_eq!(stats.pages_written, nonzero);
        assert_eq!(stats.bytes, fs::metadata(&path).unwrap().len());
        assert_eq!(stats.bytes, 52 + (stats.bytes - 52 - nonzero * 4100) + nonzero * 4100);
        assert_eq!(fs::read(&path).unwrap(), bytes_of(&image, &memory), "write_actor_to writes the same bytes");

        let file = read_actor(&path, &LIMITS).unwrap();
        assert_eq!(file.image, image);
        assert_eq!(file.page_count() as u64, nonzero);
        assert_eq!(file.file_len(), stats.bytes);
        let offsets: Vec<u64> = file.pages().map(|(o, _)| o).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        for (offset, page) in file.pages() {
            assert_eq!(page, &memory[offset as usize..offset as usize + 4096]);
        }
        assert_eq!(restored(&file), memory);
    }
}

/// An overlay's file is the plain file of the memory with the overlay applied (its range zeroed, its pieces
/// copied in), whatever the memory holds inside the range: the writer must not read it.
#[test]
fn an_overlay_stands_for_its_range_of_the_memory() {
    let mut rng = StdRng::seed_from_u64(7);
    let dir = tempfile::tempdir().unwrap();
    for case in 0..200 {
        let size = 65536 * rng.random_range(1..4usize);
        let mut memory = sparse_memory(case, size, rng.random_range(1..40u32));
        // Pages of the range start or end mid-page, and pieces straddle page edges, or cover pages whole.
        let start = rng.random_range(0..size);
        let end = rng.random_range(start..=size);
        let mut pieces = Vec::new();
        let mut at = start;
        while at < end && pieces.len() < 6 {
            let gap = rng.random_range(0..=(end - at).min(9000));
            let len = rng.random_range(0..=(end - at - gap).min(20000));
            let bytes: Vec<u8> = (0..len).map(|_| if rng.random_ratio(1, 3) { 0 } else { rng.random() }).collect();
            pieces.push((at + gap, bytes));
            at += gap + len;
        }
        let mut applied = memory.clone();
        applied[start..end].fill(0);
        for (at, bytes) in &pieces {
            applied[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        // What the writer must not read: garbage in the memory's copy of the range.
        memory[start..end].fill(0xa5);
        pieces.reverse(); // any order
        let overlay = MemoryOverlay { range: start..end, pieces: pieces.iter().map(|(a, b)| (*a, &b[..])).collect() };
        let image = sample_image(size as u64);
        let mut out = Vec::new();
        let stats = write_actor_to_overlaid(&mut out, &image, &memory, &overlay).unwrap();
        assert_eq!(out, bytes_of(&image, &applied), "case {case}: range {start}..{end}");
        assert_eq!(stats.bytes, out.len() as u64);
        let path = dir.path().join("overlaid.dwa");
        write_actor_overlaid(&path, &image, &memory, &overlay).unwrap();
        assert_eq!(fs::read(&path).unwrap(), out);
        assert_eq!(restored(&parse_actor(out, &LIMITS).unwrap()), applied);
    }
}

#[test]
fn an_overlay_that_does_not_fit_is_refused() {
    let memory = vec![1u8; 65536];
    let image = sample_image(65536);
    let piece = [7u8; 100];
    let refused = |range: std::ops::Range<usize>, pieces: Vec<(usize, &[u8])>| {
        let overlay = MemoryOverlay { range, pieces };
        let mut out = Vec::new();
        let err = write_actor_to_overlaid(&mut out, &image, &memory, &overlay).unwrap_err();
        assert!(out.is_empty(), "nothing is written");
        assert!(matches!(err, SnapshotError::BadInput { field: "overlay", .. }), "{err}");
    };
    refused(0..65537, vec![]);
    refused(100..200, vec![(150, &piece)]);
    refused(100..400, vec![(50, &piece)]);
    refused(0..400, vec![(0, &piece), (99, &piece)]);
}

#[test]
fn only_non_zero_pages_are_stored() {
    let mut memory = vec![0u8; 4 * 65536];
    memory[4096 * 5 + 4095] = 1; // last byte of page 5
    memory[4096 * 6] = 2; // first byte of page 6 (a run of two)
    memory[4096 * 63] = 3; // the last page
    let stats = write_actor_to(&mut Vec::new(), &sample_image(memory.len() as u64), &memory).unwrap();
    assert_eq!((stats.pages_written, stats.pages_total), (3, 64));
    let file = parse_actor(bytes_of(&sample_image(memory.len() as u64), &memory), &LIMITS).unwrap();
    assert_eq!(file.pages().map(|(o, _)| o / 4096).collect::<Vec<_>>(), [5, 6, 63]);
    assert_eq!(restored(&file), memory);

    let zeros = vec![0u8; 65536];
    let bytes = bytes_of(&sample_image(65536), &zeros);
    let file = parse_actor(bytes, &LIMITS).unwrap();
    assert_eq!(file.page_count(), 0);
    assert_eq!(restored(&file), zeros);
}

#[test]
fn globals_round_trip_bit_exactly() {
    let mut image = sample_image(0);
    image.globals = vec![
        ("a".into(), GlobalValue::I32(i32::MIN)),
        ("b".into(), GlobalValue::I32(-1)),
        ("c".into(), GlobalValue::I64(-1)),
        ("d".into(), GlobalValue::I64(i64::MAX)),
        ("e".into(), GlobalValue::F32(0xffff_ffff)),
        ("f".into(), GlobalValue::F64(0x7ff0_0000_0000_0001)), // signalling NaN
        ("".into(), GlobalValue::from_f32(-0.0)),
    ];
    let file = parse_actor(bytes_of(&image, &[]), &LIMITS).unwrap();
    assert_eq!(file.image.globals, image.globals);
}

#[test]
fn restore_into_checks_the_size() {
    let memory = sparse_memory(1, 65536, 2);
    let file = parse_actor(bytes_of(&sample_image(65536), &memory), &LIMITS).unwrap();
    let mut wrong = vec![9u8; 2 * 65536];
    let err = file.restore_into(&mut wrong).unwrap_err();
    assert_eq!(
        err.to_string(),
        "actor snapshot: memory: the target memory is 131072 bytes but the snapshot's memory_size is 65536"
    );
    assert!(wrong.iter().all(|&b| b == 9), "untouched");
}

#[test]
fn bad_input_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.dwa");
    let memory = vec![1u8; 65536];
    let cases: Vec<(ActorImage, &[u8], &str)> = vec![
        (ActorImage { module_digest: "ABC".into(), ..sample_image(65536) }, &memory, "module_digest: \"ABC\" is not"),
        (sample_image(2 * 65536), &memory, "memory: the memory is 65536 bytes but memory_size is 131072"),
        (sample_image(4096), &memory[..4096], "memory_size: 4096 is not a multiple of 65536"),
        (
            ActorImage {
                globals: vec![("g".into(), GlobalValue::I32(1)), ("g".into(), GlobalValue::I64(2))],
                ..sample_image(65536)
            },
            &memory,
            "globals: duplicate global name \"g\"",
        ),
    ];
    for (image, memory, needle) in cases {
        let err = write_actor(&path, &image, memory).unwrap_err();
        assert!(matches!(err, SnapshotError::BadInput { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{err} should contain {needle:?}");
    }
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn truncated_at_every_offset_is_an_error() {
    let memory = sparse_memory(3, 65536, 1_000_000); // first and last page stored
    let bytes = bytes_of(&sample_image(65536), &memory);
    for len in 0..bytes.len() {
        let err = parse_actor(bytes[..len].to_vec(), &LIMITS).unwrap_err().to_string();
        assert!(err.starts_with("invalid actor snapshot: "), "{len}: {err}");
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4100]);
    let err = parse_actor(longer, &LIMITS).unwrap_err().to_string();
    assert!(err.contains("file length") && err.contains("trailing bytes"), "{err}");
}

#[test]
fn every_bit_flip_in_the_headers_and_sampled_flips_in_the_pages_are_errors() {
    let mut memory = vec![0u8; 65536];
    memory[4096 * 7..4096 * 8].fill(0x11);
    let image = sample_image(65536);
    let bytes = bytes_of(&image, &memory);
    let data_start = bytes.len() - 4096;
    let check = |i: usize, bit: u32| {
        let mut b = bytes.clone();
        b[i] ^= 1 << bit;
        if let Ok(f) = parse_actor(b, &LIMITS) {
            panic!("flipping bit {bit} of byte {i} went unnoticed: {f:?}");
        }
    };
    for i in 0..data_start {
        for bit in 0..8 {
            check(i, bit);
        }
    }
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..256 {
        check(rng.random_range(data_start..bytes.len()), rng.random_range(0..8));
    }
}

/// An actor file assembled by hand, with the checksum recomputed as the format specifies.
fn craft(version: u32, json: &str, index: &[u32], pages: usize) -> Vec<u8> {
    let mut body = json.as_bytes().to_vec();
    for i in index {
        body.extend_from_slice(&i.to_le_bytes());
    }
    body.extend(std::iter::repeat_n(0x77u8, pages * 4096));
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    let sum = blake3_hex(&body);
    out.extend((0..32).map(|i| u8::from_str_radix(&sum[2 * i..2 * i + 2], 16).unwrap()));
    out.extend_from_slice(&body);
    out
}

fn header(memory_size: u64, pages: u64, extra: &str) -> String {
    format!(
        r#"{{"module_digest":"{}","abi_version":1,"memory_size":{memory_size},"page_size":4096,"pages":{pages},"globals":[],"models":[],"metadata":{{}}{extra}}}"#,
        "ab".repeat(32)
    )
}

/// The format version the crate writes.
const V: u32 = driftwood_snapshot::actor::FORMAT_VERSION;

#[test]
fn hostile_files_are_refused_with_a_clear_message() {
    let ok = craft(V, &header(65536, 2, ""), &[0, 15], 2);
    assert_eq!(parse_actor(ok.clone(), &LIMITS).unwrap().page_count(), 2, "the crafting helper is valid");

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "file length: 0 bytes, shorter than the 52-byte fixed header"),
        ("other magic", b"GGUF\x03\0\0\0".to_vec(), "magic: expected \"DWACTOR\\0\", found \"GGUF\\x03\\x00\\x00\\x00\""),
        ("magic prefix only", b"DWAC".to_vec(), "file length: 4 bytes"),
        ("version 1", craft(1, &header(65536, 0, ""), &[], 0), "format version: unsupported version 1 (this reader understands 2)"),
        ("not JSON", craft(V, "{\"module_digest\":", &[], 0), "header: EOF while parsing"),
        ("not UTF-8", { let mut b = craft(V, "{\"\u{1}\":1}", &[], 0); b[54] = 0xff; b }, "header: invalid unicode"),
        ("unknown member", craft(V, &header(65536, 0, ",\"extra\":1"), &[], 0), "header: unknown field `extra`"),
        ("missing member", craft(V, &header(65536, 0, "").replace("\"pages\":0,", ""), &[], 0), "header: missing field `pages`"),
        ("duplicate member", craft(V, &header(65536, 0, ",\"pages\":0"), &[], 0), "header: duplicate field `pages`"),
        ("duplicate metadata", craft(V, &header(65536, 0, "").replace("\"metadata\":{}", "\"metadata\":{\"a\":\"1\",\"a\":\"2\"}"), &[], 0), "duplicate metadata key \"a\""),
        ("abi_version too big", craft(V, &header(65536, 0, "").replace("\"abi_version\":1", "\"abi_version\":4294967296"), &[], 0), "header: invalid value"),
        ("page size", craft(V, &header(65536, 0, "").replace("\"page_size\":4096", "\"page_size\":65536"), &[], 0), "page_size: 65536"),
        ("digest", craft(V, &header(65536, 0, "").replace(&"ab".repeat(32), &"AB".repeat(32)), &[], 0), "module_digest: "),
        ("memory_size", craft(V, &header(65537, 0, ""), &[], 0), "memory_size: 65537 is not a multiple of 65536"),
        ("too many pages", craft(V, &header(65536, 17, ""), &[], 0), "pages: 17 stored pages, but a memory of 65536 bytes has only 16"),
        ("huge page count", craft(V, &header(65536, u64::MAX, ""), &[], 0), "pages: 18446744073709551615 stored pages"),
        ("claims more pages than present", craft(V, &header(65536, 3, ""), &[0, 1], 2), "file length: the file is 8438 bytes but its header describes 12538 bytes (truncated)"),
        ("index out of range", craft(V, &header(65536, 2, ""), &[0, 16], 2), "page index 1: page 16 is beyond the memory (65536 bytes, 16 pages)"),
        ("index u32::MAX", craft(V, &header(65536, 1, ""), &[u32::MAX], 1), "page index 0: page 4294967295 is beyond"),
        ("index repeated", craft(V, &header(65536, 2, ""), &[3, 3], 2), "page index 1: pages must be strictly increasing: 3 then 3"),
        ("index decreasing", craft(V, &header(65536, 2, ""), &[4, 3], 2), "page index 1: pages must be strictly increasing: 4 then 3"),
        ("i32 bits too wide", craft(V, &header(0, 0, "").replace("\"globals\":[]", "\"globals\":[{\"name\":\"g\",\"type\":\"i32\",\"bits\":4294967296}]"), &[], 0), "globals[0].bits: 4294967296 does not fit a I32 global"),
        ("unknown global type", craft(V, &header(0, 0, "").replace("\"globals\":[]", "\"globals\":[{\"name\":\"g\",\"type\":\"v128\",\"bits\":0}]"), &[], 0), "unknown variant `v128`"),
        ("duplicate global", craft(V, &header(0, 0, "").replace("\"globals\":[]", "\"globals\":[{\"name\":\"g\",\"type\":\"i32\",\"bits\":0},{\"name\":\"g\",\"type\":\"i64\",\"bits\":0}]"), &[], 0), "globals[1].name: duplicate global name \"g\""),
        ("deep nesting", craft(V, &format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)), &[], 0), "header: invalid type: sequence"),
    ];
    for (what, bytes, needle) in cases {
        let err = parse_actor(bytes, &LIMITS).expect_err(what).to_string();
        assert!(err.contains(needle), "{what}: {err:?} should contain {needle:?}");
    }

    // Header length: 0, 1, past the end, over the cap, u64::MAX.
    for (len, needle) in [
        (0u64, "header length: 0 bytes"),
        (1, "header length: 1 bytes"),
        (ok.len() as u64, "fit in the"),
        (u64::MAX, "header length: 18446744073709551615 bytes, but it must be 2..=16777216"),
    ] {
        let mut b = ok.clone();
        b[12..20].copy_from_slice(&len.to_le_bytes());
        let err = parse_actor(b, &LIMITS).unwrap_err().to_string();
        assert!(err.contains(needle), "{len}: {err}");
    }

    // Checksum: a changed stored value, or changed contents.
    let mut b = ok.clone();
    b[20] ^= 1;
    assert!(matches!(parse_actor(b, &LIMITS).unwrap_err(), SnapshotError::Checksum { .. }));
    let mut b = ok.clone();
    *b.last_mut().unwrap() ^= 0x10;
    let err = parse_actor(b, &LIMITS).unwrap_err().to_string();
    assert!(err.starts_with("actor snapshot: checksum mismatch: the file records "), "{err}");

    // Oversized claims.
    let big = craft(V, &header(2 << 30, 0, ""), &[], 0);
    let err = parse_actor(big, &LIMITS).unwrap_err();
    assert_eq!(err.to_string(), "actor snapshot: memory_size is 2147483648 bytes, over the limit of 1073741824 bytes");
    let err = parse_actor(ok, &ActorLimits { max_memory: 0 }).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { what: "memory_size", size: 65536, limit: 0, .. }), "{err:?}");
    // With no memory limit, a page count whose size overflows u64.
    let unlimited = ActorLimits { max_memory: u64::MAX };
    let memory_size = u64::MAX - 65535;
    let claim = craft(V, &header(memory_size, memory_size / 4096, ""), &[], 0);
    let err = parse_actor(claim, &unlimited).unwrap_err().to_string();
    assert!(err.contains("header describes more than 2^64 bytes (truncated)"), "{err}");
    let limits = ActorLimits { max_memory: 0 };
    let err = parse_actor(vec![0; limits.max_file_bytes() as usize + 1], &limits).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { what: "file", .. }), "{err:?}");
}

#[test]
fn oversized_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.dwa");
    let limits = ActorLimits { max_memory: 64 << 20 };
    fs::File::create(&path).unwrap().set_len(limits.max_file_bytes() + 1).unwrap(); // sparse
    let err = read_actor(&path, &limits).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { what: "file", .. }), "{err:?}");
    // Just under the cap is read, and refused on its contents.
    fs::File::create(&path).unwrap().set_len(FIXED_HEADER_BYTES as u64 + 10).unwrap();
    let err = read_actor(&path, &limits).unwrap_err().to_string();
    assert!(err.starts_with("invalid actor snapshot: magic"), "{err}");
}

#[test]
fn a_failed_overwrite_keeps_the_previous_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("actor.dwa");
    let old_memory = sparse_memory(8, 4 * 65536, 5);
    write_actor(&path, &sample_image(4 * 65536), &old_memory).unwrap();
    let old_bytes = fs::read(&path).unwrap();

    let new_memory = sparse_memory(9, 8 * 65536, 2);
    let new_image = sample_image(8 * 65536);
    let new_len = bytes_of(&new_image, &new_memory).len();
    for fail_at in [0, 1, 51, 52, 300, new_len / 2, new_len - 1] {
        let err = write_atomic(&path, |w| {
            let mut failing = FailAfter { inner: w, left: fail_at };
            write_actor_to(&mut failing, &new_image, &new_memory).map(|_| ()).map_err(std::io::Error::other)
        })
        .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), old_bytes, "failure after {fail_at} bytes");
        assert_eq!(dir_entries(dir.path()), ["actor.dwa"]);
    }
    // Invalid input: nothing happens to the old file either.
    write_actor(&path, &new_image, &new_memory[1..]).unwrap_err();
    assert_eq!(fs::read(&path).unwrap(), old_bytes);
    assert_eq!(restored(&read_actor(&path, &LIMITS).unwrap()), old_memory);
}
