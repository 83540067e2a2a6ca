//! Host calls with random arguments, made by a guest: each one completes or traps that actor with a message
//! naming the call; none panics the host, and the runtime keeps serving other actors afterwards.

use std::path::Path;
use std::sync::Arc;

use driftwood_engine::Model;
use driftwood_host::abi::ABI_VERSION;
use driftwood_host::{ActorError, ActorLimits, LogMode, Runtime, RuntimeConfig};
use proptest::prelude::*;

/// Each import the guest re-exports as `call_<name>`, with its parameter count and whether it returns `i32`.
const IMPORTS: &[(&str, usize, bool)] = &[
    ("matmul", 7, false),
    ("log", 3, false),
    ("emit", 2, false),
    ("model_open", 2, true),
    ("model_info", 2, false),
    ("tokenize", 6, true),
    ("detokenize", 6, true),
    ("chat_template", 6, true),
    ("forward", 8, false),
    ("session_save", 8, true),
    ("session_load", 7, true),
];

fn guest() -> String {
    let mut imports = String::new();
    let mut exports = String::new();
    for &(name, params, result) in IMPORTS {
        let p = " i32".repeat(params);
        let r = if result { "(result i32)" } else { "" };
        imports.push_str(&format!(r#"(import "driftwood" "{name}" (func ${name} (param{p}) {r}))"#));
        let gets: String = (0..params).map(|i| format!(" (local.get {i})")).collect();
        let drop = if result { "drop" } else { "" };
        exports.push_str(&format!(r#"(func (export "call_{name}") (param{p}) (call ${name}{gets}) {drop})"#));
    }
    format!(
        r#"(module {imports}
            (memory (export "memory") 2)
            (data (i32.const 0) "default")
            (func (export "driftwood_abi_version") (result i32) i32.const {ABI_VERSION})
            {exports})"#
    )
}

fn runtime() -> Runtime {
    let limits = ActorLimits { memory_bytes: 1 << 20, ..ActorLimits::default() };
    let rt = Runtime::new(RuntimeConfig { limits, log: LogMode::Capture, ..RuntimeConfig::default() }).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    rt.register_model("default", Arc::new(Model::load(&dir, &mut |_| {}).expect("the bundled model loads")));
    rt
}

/// Arguments near the interesting edges: small values (handles, dtypes, counts), offsets around the memory's
/// end, and anything at all.
fn arg() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..8, 0u32..140_000, 131_072u32 - 64..131_072 + 64, any::<u32>(), Just(u32::MAX), Just(1u32 << 31)]
}

fn call(actor: &mut driftwood_host::Actor, name: &str, a: &[u32]) -> Result<(), ActorError> {
    let export = format!("call_{name}");
    match *a {
        [a0, a1] => actor.call::<(u32, u32), ()>(&export, (a0, a1)),
        [a0, a1, a2] => actor.call::<(u32, u32, u32), ()>(&export, (a0, a1, a2)),
        [a0, a1, a2, a3, a4, a5] => actor.call::<(u32, u32, u32, u32, u32, u32), ()>(&export, (a0, a1, a2, a3, a4, a5)),
        [a0, a1, a2, a3, a4, a5, a6] => {
            actor.call::<(u32, u32, u32, u32, u32, u32, u32), ()>(&export, (a0, a1, a2, a3, a4, a5, a6))
        }
        [a0, a1, a2, a3, a4, a5, a6, a7] => {
            actor.call::<(u32, u32, u32, u32, u32, u32, u32, u32), ()>(&export, (a0, a1, a2, a3, a4, a5, a6, a7))
        }
        _ => unreachable!("no import has {} parameters", a.len()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_host_calls_complete_or_trap(which in 0..IMPORTS.len(), args in prop::array::uniform8(arg()), open in any::<bool>()) {
        thread_local! {
            static RUNTIME: Runtime = runtime();
            static DIR: tempfile::TempDir = tempfile::tempdir().unwrap();
        }
        let (name, params, _) = IMPORTS[which];
        RUNTIME.with(|rt| {
            let mut actor = rt.instantiate(guest().as_bytes()).unwrap();
            // Session calls read and write a file the host chose.
            DIR.with(|d| actor.set_session_file(d.path().join("session.safetensors")));
            if open {
                // Handle 0 is then a real model: the calls get past the handle check to their ranges.
                call(&mut actor, "model_open", &[0, 7]).unwrap();
            }
            match call(&mut actor, name, &args[..params]) {
                Ok(()) => {}
                Err(ActorError::Trap { message, .. }) | Err(ActorError::HostAllowance { message, .. }) => {
                    prop_assert!(message.starts_with(&format!("driftwood.{name}")), "{name}: {message}");
                }
                Err(other) => prop_assert!(false, "{name}{:?}: unexpected {other:?}", &args[..params]),
            }
            Ok(())
        })?;
    }
}
