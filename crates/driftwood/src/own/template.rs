//! The files `driftwood new` writes: a standalone actor crate with the guest SDK (and the ABI crate it uses)
//! copied in, so the crate builds anywhere, without this repository.

/// The toolchain the actor builds with: this repository's, with the wasm target.
pub const TOOLCHAIN: &str = include_str!("../../../../rust-toolchain.toml");

/// A file of the new crate: its path inside the crate, and its contents.
pub struct File {
    pub path: &'static str,
    pub contents: String,
}

/// Every file of a new actor crate named `name` (a valid crate name).
pub fn files(name: &str) -> Vec<File> {
    let channel = TOOLCHAIN
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel")?.split('"').nth(1).map(str::to_owned))
        .unwrap_or_else(|| "stable".into());
    let file = |path: &'static str, contents: String| File { path, contents };
    vec![
        file("Cargo.toml", cargo_toml(name)),
        file(
            "rust-toolchain.toml",
            format!(
                "[toolchain]\nchannel = \"{channel}\"\ntargets = [\"wasm32-unknown-unknown\"]\nprofile = \"minimal\"\n"
            ),
        ),
        // `cargo build` here builds for wasm32, which is what an actor is.
        file(".cargo/config.toml", "[build]\ntarget = \"wasm32-unknown-unknown\"\n".into()),
        file(".gitignore", "/target\n".into()),
        file("src/lib.rs", LIB_RS.replace("{name}", name)),
        file("README.md", README.replace("{name}", name).replace("{file}", &name.replace('-', "_"))),
        file("driftwood-guest/Cargo.toml", SDK_TOML.into()),
        file("driftwood-guest/src/lib.rs", include_str!("../../../../guest/sdk/src/lib.rs").into()),
        file("driftwood-guest/src/llm.rs", include_str!("../../../../guest/sdk/src/llm.rs").into()),
        file("driftwood-guest/src/sample.rs", include_str!("../../../../guest/sdk/src/sample.rs").into()),
        file("driftwood-guest/src/logprobs.rs", include_str!("../../../../guest/sdk/src/logprobs.rs").into()),
        file("driftwood-abi/Cargo.toml", ABI_TOML.into()),
        file("driftwood-abi/src/lib.rs", include_str!("../../../abi/src/lib.rs").into()),
        file("driftwood-abi/src/serve.rs", include_str!("../../../abi/src/serve.rs").into()),
    ]
}

fn cargo_toml(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
driftwood-guest = {{ path = "driftwood-guest" }}

# Its own workspace: the crate builds alone, wherever it is.
[workspace]

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    )
}

const SDK_TOML: &str = r#"[package]
name = "driftwood-guest"
description = "Guest SDK for Driftwood actors: safe wrappers over the `driftwood` host ABI (copied by `driftwood new`)."
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
publish = false

[dependencies]
driftwood-abi = { path = "../driftwood-abi" }
"#;

const ABI_TOML: &str = r#"[package]
name = "driftwood-abi"
description = "The host ABI of Driftwood actors (copied by `driftwood new`)."
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
publish = false

[dependencies]
"#;

const LIB_RS: &str = r#"//! `{name}`: a Driftwood actor.
//!
//! `driftwood run` writes the input text into this actor's memory (through `alloc`) and calls `run`; what
//! the actor emits (`driftwood_guest::emit`) is printed as it comes. Everything the actor keeps lives in its
//! own linear memory — here the number of runs and a session with the model (its tokens and KV cache) — so
//! `driftwood run --save-actor FILE` saves all of it, and `--resume-actor FILE` continues from it.

use std::cell::RefCell;

use driftwood_guest::llm::{Model, Session};

/// Tokens the session holds.
const MAX_SEQ: u32 = 1024;
/// Tokens generated per run.
const GENERATE: usize = 16;

struct State {
    model: Model,
    session: Session,
    runs: u32,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Reserves `len` bytes for the host to write the input into; returns their offset in this memory.
#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: u32) -> u32 {
    Box::leak(vec![0u8; len as usize].into_boxed_slice()).as_mut_ptr() as u32
}

/// One run: the input is `len` bytes of UTF-8 at `ptr`. Returns 0, or a negative number on failure.
#[unsafe(no_mangle)]
pub extern "C" fn run(ptr: u32, len: u32) -> i32 {
    // SAFETY: the host wrote `len` bytes at `ptr`, inside a buffer from `alloc`.
    let input = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) });
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let state = state.get_or_insert_with(|| {
            // The host's `default` model: the one `driftwood run --model` loaded.
            let model = Model::open("default");
            let session = Session::new(&model, MAX_SEQ);
            State { model, session, runs: 0 }
        });
        state.runs += 1;
        driftwood_guest::emit(&format!("[run {}] {input}", state.runs));
        // Greedy continuation of everything this actor has seen, in all its runs.
        let prompt = state.model.tokenize(&input, state.session.tokens().is_empty());
        let Some(mut logits) = state.session.feed(&prompt).map(|l| l.to_vec()) else {
            driftwood_guest::emit("\n[the session is full]\n");
            return -1;
        };
        for _ in 0..GENERATE {
            let next = argmax(&logits);
            driftwood_guest::emit(&state.model.detokenize(&[next], true));
            match state.session.feed(&[next]) {
                Some(l) => logits = l.to_vec(),
                None => break,
            }
        }
        driftwood_guest::emit("\n");
        0
    })
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}
"#;

const README: &str = r#"# {name}

A Driftwood actor. Build it and run it:

```
driftwood build .                                        # cargo build --release for wasm32 (adds the target)
driftwood run target/wasm32-unknown-unknown/release/{file}.wasm --input "Once upon a time"
driftwood run target/wasm32-unknown-unknown/release/{file}.wasm --input "Once" --save-actor run.dwa
driftwood run target/wasm32-unknown-unknown/release/{file}.wasm --input " more" --resume-actor run.dwa
```

The protocol `driftwood run` speaks: the module exports `alloc(len: u32) -> u32` (a buffer for the input) and
`run(ptr: u32, len: u32) -> i32` (0 on success); it imports the `driftwood` host module through
`driftwood-guest` (copied into this crate, with `driftwood-abi`); its output is what it emits.
"#;

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn every_source_file_of_the_sdk_and_the_abi_is_copied() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let files = super::files("demo");
        for (dir, into) in [("guest/sdk/src", "driftwood-guest/src"), ("crates/abi/src", "driftwood-abi/src")] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let copied = files.iter().find(|f| f.path == format!("{into}/{name}"));
                let source = std::fs::read_to_string(entry.path()).unwrap();
                assert_eq!(copied.map(|f| &f.contents), Some(&source), "{dir}/{name} is not copied as it is");
            }
        }
    }
}
