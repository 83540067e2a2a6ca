//! `driftwood generate` and `driftwood chat` as a user runs them, on the bundled model.

use std::io::Write;
use std::process::{Command, Stdio};

fn driftwood(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(args)
        .output()
        .expect("the driftwood binary runs")
}

#[test]
fn greedy_generation_prints_the_same_readable_text_every_run() {
    let args = ["generate", "--prompt", "Once upon a time", "--max-tokens", "48", "--temperature", "0"];
    let first = driftwood(&args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let text = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(text.starts_with("Once upon a time"), "{text}");
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 20, "{text}");
    // Readable: mostly alphabetic words, not byte noise.
    let wordy = words.iter().filter(|w| w.chars().filter(|c| c.is_alphabetic()).count() * 2 >= w.len()).count();
    assert!(wordy * 10 >= words.len() * 9, "{text}");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(stderr.contains("tokens/s decode"), "{stderr}");
    assert_eq!(driftwood(&args).stdout, first.stdout, "greedy output differs between runs");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let run =
        |seed: &str| driftwood(&["generate", "--prompt", "The king said", "--max-tokens", "24", "--seed", seed]).stdout;
    assert_eq!(run("5"), run("5"));
}

#[test]
fn chat_holds_a_multi_turn_conversation_in_one_actor() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftwood"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["chat", "--max-tokens", "12", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello there.\nWhat did the king say?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("assistant> ").count(), 2, "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let evaluated: Vec<u32> =
        stderr.lines().filter_map(|l| l.split(" evaluated").next()?.rsplit(' ').next()?.parse().ok()).collect();
    let prompts: Vec<u32> =
        stderr.lines().filter_map(|l| l.split("; prompt ").nth(1)?.split(' ').next()?.parse().ok()).collect();
    assert_eq!(evaluated.len(), 2, "{stderr}");
    assert!(evaluated[1] < prompts[1], "turn 2 re-evaluated the whole conversation: {stderr}");
}

#[test]
fn bad_parameters_and_models_are_clear_errors() {
    let out = driftwood(&["generate", "--prompt", "x", "--temperature=-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--temperature must be"));
    let out = driftwood(&["generate", "--prompt", "x", "--model", "/nonexistent/model"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no config.json"), "{stderr}");
    let out = driftwood(&["generate", "--prompt", "x", "--max-tokens", "0"]);
    assert!(!out.status.success());
}
