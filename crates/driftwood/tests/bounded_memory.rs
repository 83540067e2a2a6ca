//! Hostile files are refused by `driftwood snapshot inspect` with bounded memory: the peak resident set of the
//! process (from `wait4`) stays small whatever size the file claims. In its own test binary, with one test, so
//! that the measuring process itself stays small (see [`support::measured`]).

mod support;

use support::{MIB, measured, own_peak_rss, sparse};

#[test]
fn hostile_files_are_refused_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    eprintln!("measuring process peak RSS {:.1} MiB", own_peak_rss() as f64 / MIB as f64);
    // 40 GiB of zeros named like a safetensors file (it used to abort allocating 40 GiB).
    let zeros = sparse(dir.path(), "f.safetensors", 40 << 30, &[]);
    let (code, _, stderr, rss) = measured(&["snapshot", "inspect", &zeros]);
    eprintln!("inspect, 40 GiB sparse file: peak RSS {:.1} MiB", rss as f64 / MIB as f64);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a valid session snapshot") && stderr.contains("header length 0"), "{stderr}");
    assert!(rss < 64 * MIB, "peak RSS {rss}");

    // 5 GiB without the actor magic, with a header length that fits the file but is far over the limit.
    let head = (3u64 << 30).to_le_bytes();
    let big = sparse(dir.path(), "big.bin", 5 << 30, &head);
    let (code, _, stderr, rss) = measured(&["snapshot", "inspect", &big]);
    eprintln!("inspect, 5 GiB sparse file: peak RSS {:.1} MiB", rss as f64 / MIB as f64);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("safetensors header: header length 3221225472"), "{stderr}");
    assert!(rss < 64 * MIB, "peak RSS {rss}");

    // A 5 GiB file that starts like an actor snapshot but is not one: refused by the actor reader.
    let fake = sparse(dir.path(), "fake.actor", 5 << 30, &driftwood_snapshot::actor::MAGIC);
    let (code, _, stderr, rss) = measured(&["snapshot", "inspect", &fake]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a valid actor snapshot"), "{stderr}");
    assert!(rss < 64 * MIB, "peak RSS {rss}");
}
