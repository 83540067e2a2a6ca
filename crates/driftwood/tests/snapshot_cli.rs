//! Snapshots across processes: generate 32 tokens, save (session or whole actor), restore in a new process,
//! generate 32 more — the result equals one uninterrupted 64-token run, greedy and seeded.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{MIB, measured, sparse};

fn driftwood(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(args)
        .output()
        .expect("the driftwood binary runs")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn split_run_matches_uninterrupted(sampling: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (session, actor) = (path(dir.path(), "s.safetensors"), path(dir.path(), "a.actor"));
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(sampling.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| ok(driftwood(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let full = run(with(&["generate", "--prompt", "Once upon a time", "--max-tokens", "64"]));
    let first = run(with(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "32",
        "--save-session",
        &session,
        "--save-actor",
        &actor,
    ]));
    let from_session = run(with(&["generate", "--resume", &session, "--max-tokens", "32"]));
    let from_actor = run(with(&["generate", "--resume-actor", &actor, "--max-tokens", "32"]));
    let head = first.strip_suffix('\n').unwrap_or(&first);
    assert_eq!(format!("{head}{from_session}"), full, "session snapshot continuation differs");
    assert_eq!(format!("{head}{from_actor}"), full, "actor snapshot continuation differs");
}

#[test]
fn greedy_continuation_across_processes_is_identical() {
    split_run_matches_uninterrupted(&["--temperature", "0"]);
}

#[test]
fn seeded_sampling_continuation_across_processes_is_identical() {
    split_run_matches_uninterrupted(&["--temperature", "0.9", "--seed", "11"]);
}

#[test]
fn corrupt_or_foreign_snapshots_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let session = path(dir.path(), "s.safetensors");
    ok(driftwood(&["generate", "--prompt", "Hello", "--max-tokens", "4", "--save-session", &session]));
    let good = std::fs::read(&session).unwrap();

    // A bit flip in the KV data.
    let mut bad = good.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x10;
    let flipped = path(dir.path(), "flipped.safetensors");
    std::fs::write(&flipped, &bad).unwrap();
    let out = driftwood(&["generate", "--resume", &flipped, "--max-tokens", "4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum"), "{}", String::from_utf8_lossy(&out.stderr));

    // Truncated.
    std::fs::write(&flipped, &good[..good.len() / 2]).unwrap();
    let out = driftwood(&["generate", "--resume", &flipped, "--max-tokens", "4"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot resume"));

    // Another model.
    let other = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/golden/llama2-f32");
    let out = driftwood(&["generate", "--resume", &session, "--model", other, "--max-tokens", "4"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("model") && stderr.contains("snapshot is for"), "{stderr}");

    // A failed save never replaces the previous snapshot.
    let blocked = path(dir.path(), "no-such-dir/s.safetensors");
    let out = driftwood(&["generate", "--prompt", "Hello", "--max-tokens", "2", "--save-session", &blocked]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(&session).unwrap(), good);
}

#[test]
fn inspect_reports_both_kinds_and_rejects_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (session, actor) = (path(dir.path(), "s.safetensors"), path(dir.path(), "a.actor"));
    ok(driftwood(&[
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "5",
        "--save-session",
        &session,
        "--save-actor",
        &actor,
    ]));
    let s: serde_json::Value =
        serde_json::from_str(&ok(driftwood(&["snapshot", "inspect", &session, "--json"]))).unwrap();
    assert_eq!(s["kind"], "session");
    assert_eq!(s["metadata"]["format"], "driftwood-session");
    assert_eq!(s["n_tokens"].as_u64().unwrap() as usize, s["tokens"].as_array().unwrap().len());
    let a: serde_json::Value =
        serde_json::from_str(&ok(driftwood(&["snapshot", "inspect", &actor, "--json"]))).unwrap();
    assert_eq!(a["kind"], "actor");
    for report in [&s, &a] {
        let integrity = report["integrity"].as_str().unwrap();
        assert!(integrity.contains("BLAKE3") && !integrity.contains("SHA"), "{integrity}");
    }
    assert_eq!(s["version"], 3);
    assert_eq!(s["kv_dtype"], "bf16", "the CPU backend's default KV dtype");
    assert_eq!(a["models"][0]["name"], "default");
    assert!(a["pages_stored"].as_u64().unwrap() < a["pages_total"].as_u64().unwrap(), "only non-zero pages");
    let mut bytes = std::fs::read(&actor).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    std::fs::write(&actor, bytes).unwrap();
    let out = driftwood(&["snapshot", "inspect", &actor]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid actor snapshot"));
}

#[test]
fn hostile_session_files_are_refused_on_resume_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let fake = sparse(dir.path(), "fake.actor", 5 << 30, &driftwood_snapshot::actor::MAGIC);
    // Resuming: the baseline is a real resume of a small session.
    let session = path(dir.path(), "s.safetensors");
    ok(driftwood(&["generate", "--prompt", "Hi", "--max-tokens", "4", "--save-session", &session]));
    let (code, _, stderr, baseline) = measured(&["generate", "--resume", &session, "--max-tokens", "4"]);
    assert_eq!(code, Some(0), "{stderr}");
    // A 4 GiB session file whose header length is 0 (it used to reach 4 GiB before refusal).
    let empty = sparse(dir.path(), "empty.safetensors", 4 << 30, &[]);
    let (code, _, stderr, rss) = measured(&["generate", "--resume", &empty, "--max-tokens", "4"]);
    eprintln!(
        "generate --resume: real session peak RSS {:.1} MiB, 4 GiB sparse file {:.1} MiB",
        baseline as f64 / MIB as f64,
        rss as f64 / MIB as f64
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot resume") && stderr.contains("header length 0"), "{stderr}");
    assert!(rss < baseline + 64 * MIB, "peak RSS {rss} vs {baseline} resuming a real session");
    // An actor snapshot given as a session is recognised by its magic.
    let (code, _, stderr, _) = measured(&["generate", "--resume", &fake, "--max-tokens", "4"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("this is an actor snapshot"), "{stderr}");
}

#[test]
fn restoring_a_big_sparse_actor_writes_only_its_stored_pages() {
    use driftwood_snapshot::{ActorImage, ActorLimits, read_actor, write_actor};
    let dir = tempfile::tempdir().unwrap();
    let actor = path(dir.path(), "a.actor");
    let greedy = ["--temperature", "0"];
    let mut args = vec!["generate", "--prompt", "Once upon a time", "--max-tokens", "8", "--save-actor", &actor];
    args.extend(greedy);
    ok(driftwood(&args));

    // The same actor, its memory declared 3 GiB: the same stored pages, all else zero.
    let file = read_actor(Path::new(&actor), &ActorLimits::default()).unwrap();
    let size: u64 = 3 << 30;
    let mut memory = vec![0u8; size as usize]; // untouched pages stay unbacked
    for (offset, page) in file.pages() {
        memory[offset as usize..offset as usize + page.len()].copy_from_slice(page);
    }
    let image = ActorImage { memory_size: size, ..file.image.clone() };
    let big = path(dir.path(), "big.actor");
    let stats = write_actor(Path::new(&big), &image, &memory).unwrap();
    drop(memory);
    assert_eq!(stats.pages_written as usize, file.page_count());
    assert!(stats.bytes < 8 * MIB, "{stats:?}");

    let resume = |file: &str| {
        let mut args = vec!["generate", "--resume-actor", file, "--max-tokens", "8"];
        args.extend(greedy);
        let (code, out, stderr, rss) = measured(&args);
        assert_eq!(code, Some(0), "{stderr}");
        (out, rss)
    };
    let (small_out, small_rss) = resume(&actor);
    let (big_out, big_rss) = resume(&big);
    eprintln!(
        "resume-actor: {} stored pages; {} MiB memory peak RSS {:.1} MiB, 3072 MiB memory peak RSS {:.1} MiB",
        file.page_count(),
        file.image.memory_size >> 20,
        small_rss as f64 / MIB as f64,
        big_rss as f64 / MIB as f64
    );
    assert_eq!(big_out, small_out, "the continuation does not depend on untouched memory");
    assert!(big_rss < small_rss + 64 * MIB, "peak RSS {big_rss} restoring 3 GiB vs {small_rss}");
}
