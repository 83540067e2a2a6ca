//! `driftwood verify --json` as a user runs it: the zero-copy bars hold, and a failing placement is a
//! clear error rather than a crash.

use std::process::Command;

use serde_json::Value;

fn driftwood(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_driftwood")).args(args).output().expect("the driftwood binary runs")
}

#[test]
fn verify_json_meets_the_zero_copy_bars() {
    let out = driftwood(&["verify", "--json", "--backend", "cpu", "--trials", "5"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verify failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).expect("verify --json prints JSON");
    assert_eq!(v["pointer_identity"], true);
    assert_eq!(v["page_aligned"], true);
    assert!(v["rss_delta_zero_copy_mib"].as_f64().unwrap() <= 0.1, "{v}");
    assert!(v["rss_delta_copy_mib"].as_f64().unwrap() >= 15.0, "{v}");
    assert_eq!(v["matmul_errors"], 0);
    assert_eq!(v["matmul_elements"], 16384);
    assert_eq!(v["ledger_bytes_copied_zero_copy_path"], 0);
    // The copy path really copies: the ledger sees the 16 MiB matrix go out.
    assert!(v["ledger_bytes_copied_copy_path"].as_u64().unwrap() >= 16 << 20, "{v}");
    assert_eq!(v["region_base"], v["guest_memory_base"]);
    assert_eq!(v["region_base"], v["backend_operand_base"]);
}

#[test]
fn unavailable_backend_and_bad_placement_are_clear_errors() {
    let out = driftwood(&["verify", "--backend", "cuda"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cuda backend is unavailable"), "{stderr}");
    let out = driftwood(&["verify", "--placement", "nowhere"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown placement"));
    let out = driftwood(&["verify", "--trials", "2"]);
    assert!(!out.status.success(), "fewer than 5 trials is refused");
}
