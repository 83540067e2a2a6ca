//! Every numeric flag out of its range is refused with a message naming the flag, never a panic, and before
//! any server starts.

use std::process::Command;

/// Runs `driftwood args…`; returns (exit code, stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_driftwood")).args(args).output().expect("driftwood runs");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn refused(args: &[&str], flag: &str) {
    let (code, stderr) = run(args);
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(matches!(code, Some(c) if c != 0), "{args:?} was accepted (exit {code:?}): {stderr}");
    assert!(stderr.contains(flag), "{args:?}: the message does not name {flag}: {stderr}");
}

#[test]
fn serve_refuses_out_of_range_numbers() {
    let store = tempfile::tempdir().unwrap();
    let store = store.path().to_str().unwrap();
    let serve = |flag: &str, value: &str| {
        let arg = format!("{flag}={value}");
        refused(&["serve", "--backend", "cpu", "--addr", "127.0.0.1:0", "--store", store, &arg], flag);
    };
    for value in ["1e300", "inf", "NaN", "-1", "1e7"] {
        serve("--hibernate-after-secs", value);
    }
    for value in ["1e300", "NaN", "-0.5", "1001"] {
        serve("--batch-window-ms", value);
    }
    for value in ["0", "4097", "99999999999"] {
        serve("--memory-mib", value);
    }
    for value in ["0", "4097"] {
        serve("--host-allowance-mib", value);
    }
    for value in ["0", "86401"] {
        serve("--deadline-secs", value);
    }
    serve("--queue", "1000001");
    serve("--max-live", "0");
    serve("--workers", "0");
    serve("--default-max-tokens", "0");
    serve("--max-seq", "-1");
}

#[test]
fn generate_refuses_out_of_range_numbers() {
    let generate = |flag: &str, value: &str| {
        let arg = format!("{flag}={value}");
        refused(&["generate", "--backend", "cpu", "--prompt", "x", "--max-tokens", "1", &arg], flag);
    };
    for value in ["NaN", "inf", "-1", "101"] {
        generate("--temperature", value);
    }
    for value in ["0", "1.5", "NaN"] {
        generate("--top-p", value);
    }
    for value in ["-0.1", "2", "NaN"] {
        generate("--min-p", value);
    }
    for value in ["0", "-1", "NaN", "inf"] {
        generate("--repeat-penalty", value);
    }
    // The bundled model's context is 1,024 tokens.
    generate("--max-seq", "5000");
    refused(&["generate", "--backend", "cpu", "--prompt", "x", "--max-tokens", "0"], "--max-tokens");
}
