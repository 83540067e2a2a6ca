//! The sandbox holds under hostile guests: every bad range traps with a message naming the call and the
//! range, limits produce clear errors, and the host and other actors keep running.

use std::time::{Duration, Instant};

use driftwood_host::{ActorError, ActorLimits, Backend, LogMode, Runtime, RuntimeConfig};

fn runtime(limits: ActorLimits) -> Runtime {
    Runtime::new(RuntimeConfig { limits, log: LogMode::Capture, ..RuntimeConfig::default() }).unwrap()
}

/// A module with one page of memory, the ABI imports, and `body` as extra functions.
fn guest(body: &str) -> String {
    format!(
        r#"(module
            (import "driftwood" "matmul" (func $matmul (param i32 i32 i32 i32 i32 i32 i32)))
            (import "driftwood" "log" (func $log (param i32 i32 i32)))
            (memory (export "memory") 1)
            (func (export "driftwood_abi_version") (result i32) i32.const 1)
            {body})"#
    )
}

/// Calls `matmul(a, b, c, m, n, k, dtype)` from a fresh guest and returns the trap message.
fn matmul_trap(args: [u32; 7]) -> String {
    let rt = runtime(ActorLimits::default());
    let [a, b, c, m, n, k, dtype] = args;
    let wat = guest(&format!(
        r#"(func (export "go") (call $matmul (i32.const {a}) (i32.const {b}) (i32.const {c})
                                           (i32.const {m}) (i32.const {n}) (i32.const {k}) (i32.const {dtype})))"#
    ));
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    match actor.call::<(), ()>("go", ()) {
        Err(ActorError::Trap { export, message }) => {
            assert_eq!(export, "go");
            message
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn out_of_bounds_operand_traps_with_call_and_range() {
    // a: 4×4 f32 = 64 bytes at 65500 runs past the 65536-byte memory.
    let msg = matmul_trap([65500, 0, 1024, 4, 4, 4, 0]);
    assert!(msg.starts_with("driftwood.matmul: operand `a`"), "{msg}");
    assert!(msg.contains("0x0000ffdc..0x0000fffc") || msg.contains("0x0000ffdc"), "{msg}");
    assert!(msg.contains("outside the actor's 65536-byte memory"), "{msg}");
}

#[test]
fn output_past_the_end_traps() {
    let msg = matmul_trap([0, 64, 65532, 4, 4, 4, 0]);
    assert!(msg.contains("operand `c`") && msg.contains("outside"), "{msg}");
}

#[test]
fn range_wrapping_the_32_bit_space_traps() {
    // 0xFFFFFFF0 + 64 bytes wraps past 2^32.
    let msg = matmul_trap([0xFFFF_FFF0, 0, 1024, 4, 4, 4, 0]);
    assert!(msg.contains("operand `a`") && msg.contains("wraps past the end of the 32-bit address space"), "{msg}");
}

#[test]
fn huge_dimensions_are_rejected_before_any_work() {
    // m·k = 2^32 - 1 squared-ish: far beyond memory, must not allocate or touch anything.
    let msg = matmul_trap([0, 0, 0, u32::MAX, u32::MAX, u32::MAX, 0]);
    assert!(msg.starts_with("driftwood.matmul: operand `a`"), "{msg}");
}

#[test]
fn misaligned_operand_traps() {
    let msg = matmul_trap([2, 64, 1024, 4, 4, 4, 0]);
    assert!(msg.contains("operand `a`") && msg.contains("misaligned"), "{msg}");
    // bf16 operands need only 2-byte alignment, but the f32 output still needs 4.
    let msg = matmul_trap([2, 64, 1026, 4, 4, 4, 1]);
    assert!(msg.contains("operand `c`") && msg.contains("misaligned"), "{msg}");
}

#[test]
fn unknown_dtype_traps() {
    let msg = matmul_trap([0, 64, 1024, 4, 4, 4, 9]);
    assert!(msg.contains("unknown dtype code 9"), "{msg}");
}

#[test]
fn output_aliasing_an_input_traps() {
    let msg = matmul_trap([0, 4096, 32, 4, 4, 4, 0]);
    assert!(msg.contains("output `c`") && msg.contains("overlaps input `a`"), "{msg}");
}

#[test]
fn log_with_bad_range_traps_and_good_log_is_captured() {
    let rt = runtime(ActorLimits::default());
    let wat = guest(
        r#"(data (i32.const 16) "hello from wasm")
           (func (export "good") (call $log (i32.const 2) (i32.const 16) (i32.const 15)))
           (func (export "bad") (call $log (i32.const 2) (i32.const 65530) (i32.const 100)))"#,
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    actor.call::<(), ()>("good", ()).unwrap();
    let logs = actor.take_logs();
    assert_eq!(logs.len(), 1);
    assert_eq!((logs[0].level, logs[0].text.as_str()), (2, "hello from wasm"));
    assert_eq!(actor.ledger().text_bytes, 15, "the log line is the one copy, and the ledger shows it");
    let err = actor.call::<(), ()>("bad", ()).unwrap_err();
    assert!(err.to_string().contains("driftwood.log: operand `message`"), "{err}");
}

#[test]
fn a_trapping_actor_leaves_the_host_and_other_actors_running() {
    let rt = runtime(ActorLimits::default());
    let mut good = rt.instantiate(driftwood_actors::MATMUL_CHECK).unwrap();
    let wat = guest(
        r#"(func (export "go") (call $matmul (i32.const 65500) (i32.const 0) (i32.const 1024)
                         (i32.const 4) (i32.const 4) (i32.const 4) (i32.const 0)))
                       (func (export "fine") (result i32) i32.const 42)"#,
    );
    let mut bad = rt.instantiate(wat.as_bytes()).unwrap();
    assert!(bad.call::<(), ()>("go", ()).is_err());
    // The trapped actor can still be called, and the other actor computes correctly.
    assert_eq!(bad.call::<(), i32>("fine", ()).unwrap(), 42);
    assert_eq!(good.call::<(u32, u32), u32>("run_check", (11, 0)).unwrap(), 0);
}

#[test]
fn memory_cap_stops_growth_with_a_clear_error() {
    let cap = 4 << 20;
    let rt = runtime(ActorLimits { memory_bytes: cap, ..ActorLimits::default() });
    let wat = guest(r#"(func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))"#);
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    assert_eq!(actor.call::<u32, i32>("grow", 63).unwrap(), 1); // 64 pages = 4 MiB: exactly the cap
    match actor.call::<u32, i32>("grow", 1) {
        Err(ActorError::MemoryCap { export, message }) => {
            assert_eq!(export, "grow");
            assert!(message.contains("4259840 bytes") && message.contains(&format!("cap is {cap} bytes")), "{message}");
        }
        other => panic!("expected MemoryCap, got {other:?}"),
    }
    assert_eq!(actor.memory_size(), cap, "a refused growth changes nothing");
    // A module whose initial memory is already over the cap is refused at instantiation.
    let big = r#"(module (memory (export "memory") 100)
                   (func (export "driftwood_abi_version") (result i32) i32.const 1))"#;
    match rt.instantiate(big.as_bytes()) {
        Err(ActorError::MemoryCap { .. }) => {}
        other => panic!("expected MemoryCap at instantiation, got {:?}", other.err()),
    }
}

#[test]
fn runaway_guest_is_interrupted_at_its_deadline() {
    let deadline = Duration::from_millis(200);
    let rt = runtime(ActorLimits { deadline, ..ActorLimits::default() });
    let wat = guest(r#"(func (export "spin") (loop $l (br $l)))"#);
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    let start = Instant::now();
    match actor.call::<(), ()>("spin", ()) {
        Err(ActorError::Deadline { export, deadline: d }) => assert_eq!((export.as_str(), d), ("spin", deadline)),
        other => panic!("expected Deadline, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(took >= deadline, "interrupted before its deadline: {took:?}");
    // The runtime is fine: another actor runs to completion.
    let mut good = rt.instantiate(driftwood_actors::MATMUL_CHECK).unwrap();
    assert_eq!(good.call::<(u32, u32), u32>("run_check", (3, 0)).unwrap(), 0);
}

#[test]
fn memory_growth_keeps_the_base_pointer_and_contents() {
    let rt = runtime(ActorLimits::default());
    let wat = guest(
        r#"(func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
           (func (export "store") (param i32 i32) (i32.store (local.get 0) (local.get 1)))
           (func (export "load") (param i32) (result i32) (i32.load (local.get 0)))"#,
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    let base = actor.memory_base();
    assert_eq!(base, actor.region().base() as *const u8);
    actor.call::<(u32, u32), ()>("store", (4096, 0xC0FFEE)).unwrap();
    for pages in [1u32, 15, 240, 1024] {
        actor.call::<u32, i32>("grow", pages).unwrap();
        assert_eq!(actor.memory_base(), base, "memory moved after growing {pages} pages");
        assert_eq!(actor.region().base() as *const u8, base);
        assert_eq!(actor.region().len(), actor.memory_size());
    }
    assert_eq!(actor.call::<u32, u32>("load", 4096).unwrap(), 0xC0FFEE);
    // New pages are zero.
    let top = actor.memory_size() as u32 - 4;
    assert_eq!(actor.call::<u32, u32>("load", top).unwrap(), 0);
}

#[test]
fn abi_version_mismatch_and_missing_exports_are_refused() {
    let rt = runtime(ActorLimits::default());
    let v7 =
        r#"(module (memory (export "memory") 1) (func (export "driftwood_abi_version") (result i32) i32.const 7))"#;
    assert!(matches!(rt.instantiate(v7.as_bytes()), Err(ActorError::AbiMismatch { guest: 7, host: 1 })));
    // A guest built for ABI v0 (no KV dtype in `forward`) is refused before it can call with the old layout.
    let v0 = v7.replace("i32.const 7", "i32.const 0");
    let err = rt.instantiate(v0.as_bytes()).err().unwrap();
    assert!(matches!(err, ActorError::AbiMismatch { guest: 0, host: 1 }), "{err}");
    let unversioned = r#"(module (memory (export "memory") 1))"#;
    let err = rt.instantiate(unversioned.as_bytes()).err().unwrap();
    assert!(err.to_string().contains("driftwood_abi_version"), "{err}");
    let no_memory = r#"(module (func (export "driftwood_abi_version") (result i32) i32.const 1))"#;
    let err = rt.instantiate(no_memory.as_bytes()).err().unwrap();
    assert!(err.to_string().contains("exports no memory"), "{err}");
    let imports_memory = r#"(module (import "env" "memory" (memory 1)))"#;
    assert!(matches!(rt.instantiate(imports_memory.as_bytes()), Err(ActorError::Instantiate(_))));
    let unknown_import = r#"(module (import "driftwood" "launch_missiles" (func)) (memory (export "memory") 1))"#;
    let err = rt.instantiate(unknown_import.as_bytes()).err().unwrap();
    assert!(err.to_string().contains("launch_missiles"), "{err}");
    assert!(matches!(rt.instantiate(b"\0asm garbage"), Err(ActorError::Compile(_))));
}

#[test]
fn example_actor_computes_in_place_with_zero_copies() {
    let rt = runtime(ActorLimits::default());
    let mut actor = rt.instantiate(driftwood_actors::MATMUL_CHECK).unwrap();
    for dtype in [0u32, 1] {
        let errors: u32 = actor.call("run_check", (42u32, dtype)).unwrap();
        assert_eq!(errors, 0, "dtype {dtype}");
        let base = actor.region().base() as usize;
        assert_eq!(actor.memory_base() as usize, base);
        let seen = rt.device().last_operands();
        for (i, addr) in [seen.a, seen.b, seen.c].into_iter().enumerate() {
            let offset: u32 = actor.call("check_offset", i as u32).unwrap();
            assert_eq!(addr, base + offset as usize, "operand {i} was not computed in place");
        }
    }
    assert_eq!(actor.call::<(), u32>("check_elements", ()).unwrap(), 128 * 128);
    assert_eq!(actor.ledger().total_bytes(), 0);
    actor.call::<(), ()>("report", ()).unwrap();
    let logs = actor.take_logs();
    assert!(logs[0].text.starts_with("matmul check: 0 errors of 16384 elements"), "{logs:?}");
}

#[test]
fn dropping_an_actor_releases_its_region() {
    let rt = runtime(ActorLimits::default());
    let actor = rt.instantiate(driftwood_actors::MATMUL_CHECK).unwrap();
    assert_eq!(rt.live_regions(), 1);
    drop(actor);
    assert_eq!(rt.live_regions(), 0);
}
