//! Users' own actors as a new user makes them: `driftwood new`, `driftwood build`, `driftwood run`, with the
//! actor saved after one run and resumed for the next.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn driftwood(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_driftwood")).current_dir(dir).args(args).output().expect("driftwood runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_new_actor_builds_runs_and_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let made = driftwood(dir, &["new", "demo-agent"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(text(&made.stdout).contains("driftwood build"), "it says what comes next: {}", text(&made.stdout));
    assert!(dir.join("demo-agent/src/lib.rs").is_file() && dir.join("demo-agent/driftwood-guest/src/llm.rs").is_file());

    let built = driftwood(dir, &["build", "demo-agent"]);
    assert!(built.status.success(), "{}", text(&built.stderr));
    let wasm = text(&built.stdout).lines().last().unwrap_or_default().trim().to_owned();
    assert!(wasm.ends_with("demo_agent.wasm") && dir.join(&wasm).is_file(), "{}", text(&built.stdout));

    let first = driftwood(dir, &["run", &wasm, "--input", "Once upon a time", "--save-actor", "a.dwa"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let out = text(&first.stdout);
    assert!(out.starts_with("[run 1] Once upon a time"), "{out}");
    assert!(out.trim_end().len() > "[run 1] Once upon a time".len(), "the model continued the input: {out}");

    // The input from standard input, into the saved actor: its count of runs, kept in its memory, goes on.
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .current_dir(dir)
        .args(["run", &wasm, "--input", "-", "--resume-actor", "a.dwa"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b" there was").unwrap();
    let second = child.wait_with_output().unwrap();
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(text(&second.stdout).starts_with("[run 2]  there was"), "{}", text(&second.stdout));
    // A fresh actor starts counting again.
    let fresh = driftwood(dir, &["run", &wasm, "--input", "x"]);
    assert!(text(&fresh.stdout).starts_with("[run 1] x"), "{}", text(&fresh.stdout));
}

#[test]
fn mistakes_get_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bad_name = driftwood(dir, &["new", "1st"]);
    assert!(!bad_name.status.success() && text(&bad_name.stderr).contains("cannot name an actor crate"));
    assert!(driftwood(dir, &["new", "twice"]).status.success());
    let again = driftwood(dir, &["new", "twice"]);
    assert!(!again.status.success() && text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
    let not_a_crate = driftwood(dir, &["build", "nowhere"]);
    assert!(text(&not_a_crate.stderr).contains("is not an actor crate"), "{}", text(&not_a_crate.stderr));

    // A module that speaks the ABI but not `driftwood run`'s protocol.
    std::fs::write(
        dir.join("no-run.wat"),
        r#"(module (memory (export "memory") 1)
             (func (export "driftwood_abi_version") (result i32) i32.const 1)
             (func (export "alloc") (param i32) (result i32) i32.const 1024))"#,
    )
    .unwrap();
    let no_run = driftwood(dir, &["run", "no-run.wat", "--input", "hi"]);
    let said = text(&no_run.stderr);
    assert!(!no_run.status.success() && said.contains("run(ptr: u32, len: u32) -> i32"), "{said}");
    let missing = driftwood(dir, &["run", "missing.wasm"]);
    assert!(text(&missing.stderr).contains("cannot read the actor missing.wasm"), "{}", text(&missing.stderr));
    for out in [&bad_name, &again, &not_a_crate, &no_run, &missing] {
        assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
    }
}
