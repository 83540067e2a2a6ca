//! Every cost an actor can cause is bounded and charged to it: a long host call stops at the call's deadline,
//! host memory kept for an actor (emitted text, captured logs, model handles) stays within its host allowance,
//! and the actor that passes a bound gets a clear error of its own while other actors run on unchanged.
//!
//! The peak-RSS checks run each reproduction in a child process (this test binary, re-run for one test), so
//! that tests running beside it do not count.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftwood_engine::Model;
use driftwood_host::abi::ABI_VERSION;
use driftwood_host::{Actor, ActorError, ActorLimits, LogMode, MAX_MODEL_HANDLES, Runtime, RuntimeConfig};

const MIB: usize = 1 << 20;

fn runtime(limits: ActorLimits) -> Runtime {
    Runtime::new(RuntimeConfig { limits, log: LogMode::Capture, ..RuntimeConfig::default() }).unwrap()
}

fn bundled() -> Arc<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    Arc::new(Model::load(&dir, &mut |_| {}).expect("the bundled model loads"))
}

/// A module with `pages` pages of memory, the ABI imports other than `forward`, and `body`.
fn guest(pages: u32, body: &str) -> String {
    format!(
        r#"(module
            (import "driftwood" "matmul" (func $matmul (param i32 i32 i32 i32 i32 i32 i32)))
            (import "driftwood" "log" (func $log (param i32 i32 i32)))
            (import "driftwood" "emit" (func $emit (param i32 i32)))
            (import "driftwood" "model_open" (func $model_open (param i32 i32) (result i32)))
            (import "driftwood" "detokenize" (func $detokenize (param i32 i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") {pages})
            (func (export "driftwood_abi_version") (result i32) i32.const {ABI_VERSION})
            {body})"#
    )
}

/// Greedy text of the bundled chat actor alone in `rt`, for comparing with the same actor next to a hostile one.
fn chat_text(rt: &Runtime) -> String {
    let mut actor = rt.instantiate(driftwood_actors::CHAT).unwrap();
    actor.call::<u32, ()>("init", 128).unwrap();
    actor.call::<(f32, u32, f32, f32, f32, u64), ()>("set_sampling", (0.0, 0, 1.0, 0.0, 1.0, 0)).unwrap();
    let prompt = "Once upon a time";
    let ptr: u32 = actor.call("alloc", prompt.len() as u32).unwrap();
    actor.write_text(ptr as usize, prompt.as_bytes()).unwrap();
    let n: i32 = actor.call("generate", (ptr, prompt.len() as u32, 24u32)).unwrap();
    assert_eq!(n, 24);
    actor.take_emitted()
}

/// Runs `hostile` on its own thread while the chat actor generates in the same runtime; checks the chat text is
/// the one it produces alone and returns what `hostile` returned.
/// Calls the actor's `go` beside a chat actor (see [`beside_chat`]); it must fail with its own deadline. Returns
/// how long the call took.
fn go_past_deadline(rt: &Runtime, actor: &mut Actor, deadline: Duration) -> Duration {
    let (result, took) = beside_chat(rt, || {
        let started = Instant::now();
        let result = actor.call::<(), ()>("go", ());
        (result, started.elapsed())
    });
    match result {
        Err(ActorError::Deadline { export, deadline: d }) => assert_eq!((export.as_str(), d), ("go", deadline)),
        other => panic!("expected Deadline, got {other:?}"),
    }
    took
}

fn beside_chat<T: Send>(rt: &Runtime, hostile: impl FnOnce() -> T + Send) -> T {
    let alone = chat_text(rt);
    let (result, beside) = std::thread::scope(|s| {
        let h = s.spawn(hostile);
        let beside = chat_text(rt);
        (h.join().expect("the hostile actor's thread"), beside)
    });
    assert_eq!(beside, alone, "the other actor's text changed");
    result
}

/// Current and peak resident set of this process, in bytes (Linux `/proc/self/status`).
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<usize>().ok())
            .expect("field")
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---- Deadlines inside host calls ------------------------------------------------------------------------

#[test]
fn a_matmul_past_its_deadline_stops_within_twice_the_deadline() {
    // bf16 a (m×k), b (k×n), f32 c (m×n): 137 G multiply-adds, seconds of work on a few CPU cores, in pieces
    // of 1,024 rows (b is small, so a piece is nearly all arithmetic).
    let (m, n, k) = (32768u32, 2048u32, 2048u32);
    let (a, b) = (0u32, m * k * 2);
    let c = b + k * n * 2;
    let bytes = c as usize + (m * n) as usize * 4;
    let pages = bytes.div_ceil(65536) as u32;
    let last = c + (m * n - 1) * 4;
    let deadline = Duration::from_millis(500);
    let rt = runtime(ActorLimits::default());
    rt.register_model("default", bundled());
    let limits = ActorLimits { deadline, memory_bytes: pages as usize * 65536, ..ActorLimits::default() };
    // The guest marks c's last element, then multiplies.
    let wat = guest(
        pages,
        &format!(
            r#"(func (export "go")
                 (f32.store (i32.const {last}) (f32.const 12345))
                 (call $matmul (i32.const {a}) (i32.const {b}) (i32.const {c})
                               (i32.const {m}) (i32.const {n}) (i32.const {k}) (i32.const 1)))"#
        ),
    );
    let mut actor = rt.instantiate_module(&rt.compile(wat.as_bytes()).unwrap(), limits).unwrap();
    let took = go_past_deadline(&rt, &mut actor, deadline);
    eprintln!("matmul {m}x{n}x{k} bf16 under a {deadline:?} deadline returned after {took:?}");
    assert!(took < deadline * 2, "the call returned {took:?} after it started, past twice its {deadline:?} deadline");
    // The work was cut short: the last row of c was never computed.
    let mut mark = [0u8; 4];
    actor.read_memory(last as usize, &mut mark).unwrap();
    assert_eq!(f32::from_le_bytes(mark), 12345.0, "the product ran to completion despite the deadline");
}

#[test]
fn a_forward_past_its_deadline_stops_within_twice_the_deadline() {
    let model = bundled();
    let max_seq = 1024u32;
    let kv_bytes = (model.kv_floats(max_seq as usize) * 4) as u32;
    let (kv, tokens) = (0u32, kv_bytes);
    let logits = tokens + max_seq * 4;
    let pages = (logits as usize + model.config().vocab_size * 4).div_ceil(65536) as u32;
    let deadline = Duration::from_millis(250);
    let rt = runtime(ActorLimits::default());
    rt.register_model("default", model);
    // A whole-context prompt of token ids 1..=1024, then one `forward` (ABI v1: f32 cache).
    let wat = format!(
        r#"(module
            (import "driftwood" "model_open" (func $model_open (param i32 i32) (result i32)))
            (import "driftwood" "forward" (func $forward (param i32 i32 i32 i32 i32 i32 i32 i32)))
            (memory (export "memory") {pages})
            (data (i32.const {logits}) "default")
            (func (export "driftwood_abi_version") (result i32) i32.const {ABI_VERSION})
            (func (export "go") (local $i i32) (local $m i32)
              (local.set $m (call $model_open (i32.const {logits}) (i32.const 7)))
              (loop $l (if (i32.lt_u (local.get $i) (i32.const {max_seq})) (then
                (i32.store (i32.add (i32.const {tokens}) (i32.shl (local.get $i) (i32.const 2)))
                           (i32.add (local.get $i) (i32.const 1)))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $l))))
              (call $forward (local.get $m) (i32.const {kv}) (i32.const 0) (i32.const {max_seq}) (i32.const 0)
                             (i32.const {tokens}) (i32.const {max_seq}) (i32.const {logits}))))"#
    );
    let limits = ActorLimits { deadline, ..ActorLimits::default() };
    let mut actor = rt.instantiate_module(&rt.compile(wat.as_bytes()).unwrap(), limits).unwrap();
    let took = go_past_deadline(&rt, &mut actor, deadline);
    eprintln!("forward of {max_seq} tokens under a {deadline:?} deadline returned after {took:?}");
    assert!(took < deadline * 2, "the call returned {took:?} after it started, past twice its {deadline:?} deadline");
    // The pass was cut short: the last layer's value row of the last token was never written.
    let mut row = vec![0u8; 512];
    actor.read_memory((kv + kv_bytes) as usize - row.len(), &mut row).unwrap();
    assert!(row.iter().all(|&b| b == 0), "the forward pass ran to completion despite the deadline");
}

#[test]
fn a_shut_down_runtime_stops_long_host_calls() {
    let (m, n, k) = (32768u32, 2048u32, 2048u32);
    let (a, b) = (0u32, m * k * 2);
    let c = b + k * n * 2;
    let pages = (c as usize + (m * n) as usize * 4).div_ceil(65536) as u32;
    let rt = runtime(ActorLimits { memory_bytes: pages as usize * 65536, ..ActorLimits::default() });
    let wat = guest(
        pages,
        &format!(
            r#"(func (export "go") (call $matmul (i32.const {a}) (i32.const {b}) (i32.const {c})
                                          (i32.const {m}) (i32.const {n}) (i32.const {k}) (i32.const 1)))"#
        ),
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    rt.shutdown();
    assert!(rt.is_shut_down());
    match actor.call::<(), ()>("go", ()) {
        Err(ActorError::Shutdown { export }) => assert_eq!(export, "go"),
        other => panic!("expected Shutdown, got {other:?}"),
    }
}

#[test]
fn a_matmul_split_into_row_blocks_computes_the_same_product() {
    // A product of several pieces: a (m×k) of ones times b (k×n) of twos.
    let (m, n, k) = (2048u32, 2048u32, 2048u32);
    let (a, b) = (0u32, m * k * 4);
    let c = b + k * n * 4;
    let pages = (c as usize + (m * n) as usize * 4).div_ceil(65536) as u32;
    let rt = runtime(ActorLimits::default());
    let wat = guest(
        pages,
        &format!(
            r#"(func $fill (param $at i32) (param $n i32) (param $v f32)
                 (loop $l (if (local.get $n) (then
                   (f32.store (local.get $at) (local.get $v))
                   (local.set $at (i32.add (local.get $at) (i32.const 4)))
                   (local.set $n (i32.sub (local.get $n) (i32.const 1)))
                   (br $l)))))
               (func (export "go")
                 (call $fill (i32.const {a}) (i32.const {mk}) (f32.const 1))
                 (call $fill (i32.const {b}) (i32.const {kn}) (f32.const 2))
                 (call $matmul (i32.const {a}) (i32.const {b}) (i32.const {c})
                               (i32.const {m}) (i32.const {n}) (i32.const {k}) (i32.const 0)))"#,
            mk = m * k,
            kn = k * n
        ),
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    assert!(
        u64::from(m) * u64::from(n) * u64::from(k) > driftwood_host::abi::MATMUL_PIECE_MACS,
        "the product must need several pieces"
    );
    actor.call::<(), ()>("go", ()).unwrap();
    let mut out = vec![0u8; (m * n) as usize * 4];
    actor.read_memory(c as usize, &mut out).unwrap();
    let expected = 2.0 * k as f32;
    assert!(out.chunks_exact(4).all(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]) == expected));
}

// ---- Host memory: emitted text, logs, model handles ------------------------------------------------------

/// 16 MiB of memory filled with `a`; `go` emits all of it `times` times.
fn emitter(times: u32) -> String {
    guest(
        256,
        &format!(
            r#"(func (export "go") (local $i i32)
                 (memory.fill (i32.const 0) (i32.const 97) (i32.const {len}))
                 (loop $l (if (i32.lt_u (local.get $i) (i32.const {times})) (then
                   (call $emit (i32.const 0) (i32.const {len}))
                   (local.set $i (i32.add (local.get $i) (i32.const 1)))
                   (br $l)))))"#,
            len = 16 * MIB
        ),
    )
}

fn expect_allowance_trap(result: Result<(), ActorError>, call: &str) -> String {
    match result {
        Err(ActorError::HostAllowance { export, message }) => {
            assert_eq!(export, "go");
            assert!(message.starts_with(call) && message.contains("host allowance"), "{message}");
            message
        }
        other => panic!("expected HostAllowance, got {other:?}"),
    }
}

#[test]
fn emitting_past_the_host_allowance_traps_that_actor_alone() {
    let limits = ActorLimits { memory_bytes: 16 * MIB, ..ActorLimits::default() };
    let rt = runtime(limits);
    rt.register_model("default", bundled());
    let mut actor = rt.instantiate(emitter(64).as_bytes()).unwrap();
    let result = beside_chat(&rt, || actor.call::<(), ()>("go", ()));
    expect_allowance_trap(result, "driftwood.emit");
    // One 16 MiB emit fitted the 16 MiB default; the host kept it and nothing more.
    assert!(actor.host_bytes() <= limits.host_bytes);
    assert_eq!(actor.take_emitted().len(), 16 * MIB);
    assert_eq!(actor.host_bytes(), 0, "taking the text frees the allowance");
}

#[test]
fn a_sink_that_refuses_text_traps_the_actor_with_its_message() {
    let rt = runtime(ActorLimits::default());
    let mut actor = rt.instantiate(emitter(2).as_bytes()).unwrap();
    let mut seen = 0;
    actor.set_emit_sink(move |piece| {
        seen += piece.len();
        if seen > 16 * MIB { Err(format!("the sink holds {seen} bytes")) } else { Ok(()) }
    });
    match actor.call::<(), ()>("go", ()) {
        Err(ActorError::HostAllowance { message, .. }) => {
            assert_eq!(message, "driftwood.emit: the sink holds 33554432 bytes")
        }
        other => panic!("expected HostAllowance, got {other:?}"),
    }
}

#[test]
fn captured_logs_stay_within_the_host_allowance_keeping_the_newest() {
    let limits = ActorLimits { memory_bytes: MIB, host_bytes: 4 * MIB, ..ActorLimits::default() };
    let rt = runtime(limits);
    // 10,000 lines of 64 KiB, the level of each its number.
    let wat = guest(
        2,
        r#"(func (export "go") (local $i i32)
             (loop $l (if (i32.lt_u (local.get $i) (i32.const 10000)) (then
               (call $log (local.get $i) (i32.const 0) (i32.const 65536))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br $l)))))"#,
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    actor.call::<(), ()>("go", ()).unwrap();
    assert!(actor.host_bytes() <= limits.host_bytes, "{} bytes kept", actor.host_bytes());
    let logs = actor.take_logs();
    assert!(!logs.is_empty() && logs.len() < 64, "{} lines kept", logs.len());
    assert_eq!(logs.last().map(|l| l.level), Some(9999), "the newest line is kept");
    let levels: Vec<u32> = logs.iter().map(|l| l.level).collect();
    assert!(levels.windows(2).all(|w| w[1] == w[0] + 1), "the newest lines, in order: {levels:?}");
    assert_eq!(actor.host_bytes(), 0);
}

#[test]
fn a_log_line_that_cannot_fit_beside_undrained_text_traps() {
    let limits = ActorLimits { host_bytes: 16 * MIB, ..ActorLimits::default() };
    let rt = runtime(limits);
    let wat = guest(
        256,
        &format!(
            r#"(func (export "go")
                 (call $emit (i32.const 0) (i32.const {len}))
                 (call $log (i32.const 2) (i32.const 0) (i32.const 65536)))"#,
            len = 16 * MIB - 1000
        ),
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    expect_allowance_trap(actor.call::<(), ()>("go", ()), "driftwood.log");
}

/// `go(n)` opens the model `default` n times and returns the last handle.
fn opener() -> String {
    guest(
        1,
        r#"(data (i32.const 0) "default")
           (func (export "go") (param $n i32) (result i32) (local $h i32)
             (loop $l (if (local.get $n) (then
               (local.set $h (call $model_open (i32.const 0) (i32.const 7)))
               (local.set $n (i32.sub (local.get $n) (i32.const 1)))
               (br $l))))
             (local.get $h))
           (func (export "open") (param $ptr i32) (param $len i32) (result i32)
             (call $model_open (local.get $ptr) (local.get $len)))"#,
    )
}

#[test]
fn opening_a_model_again_reuses_its_handle() {
    let rt = runtime(ActorLimits::default());
    rt.register_model("default", bundled());
    let mut actor = rt.instantiate(opener().as_bytes()).unwrap();
    let used = |actor: &Actor| actor.host_bytes();
    assert_eq!(actor.call::<u32, i32>("go", 1).unwrap(), 0);
    let one = used(&actor);
    assert_eq!(actor.call::<u32, i32>("go", 200_000).unwrap(), 0, "the same handle every time");
    assert_eq!(used(&actor), one, "no host memory per call");
    // The actor can still be snapshotted, with its one handle.
    let dir = tempfile::tempdir().unwrap();
    actor.save_snapshot(&dir.path().join("a.actor"), Default::default()).unwrap();
}

#[test]
fn distinct_model_handles_are_capped() {
    let rt = runtime(ActorLimits::default());
    let model = bundled();
    let names: Vec<String> = (0..MAX_MODEL_HANDLES + 1).map(|i| format!("m{i:05}")).collect();
    for name in &names {
        rt.register_model(name, model.clone());
    }
    let mut actor = rt.instantiate(opener().as_bytes()).unwrap();
    let ptr = 1024;
    for (i, name) in names.iter().enumerate() {
        actor.write_text(ptr, name.as_bytes()).unwrap();
        let result = actor.call::<(u32, u32), i32>("open", (ptr as u32, name.len() as u32));
        if i < MAX_MODEL_HANDLES {
            assert_eq!(result.unwrap(), i as i32);
            continue;
        }
        match result {
            Err(ActorError::HostAllowance { message, .. }) => {
                assert!(message.contains("model handles"), "{message}")
            }
            other => panic!("expected HostAllowance, got {other:?}"),
        }
    }
    // Reopening one already open still works, and the actor can still be snapshotted.
    actor.write_text(ptr, names[3].as_bytes()).unwrap();
    assert_eq!(actor.call::<(u32, u32), i32>("open", (ptr as u32, 6)).unwrap(), 3);
    let dir = tempfile::tempdir().unwrap();
    actor.save_snapshot(&dir.path().join("a.actor"), Default::default()).unwrap();
}

#[test]
fn invalid_limits_are_refused() {
    for limits in [
        ActorLimits { host_bytes: 1024, ..ActorLimits::default() },
        ActorLimits { deadline: Duration::ZERO, ..ActorLimits::default() },
        ActorLimits { deadline: Duration::from_secs(u64::MAX), ..ActorLimits::default() },
        ActorLimits { memory_bytes: 0, ..ActorLimits::default() },
    ] {
        let err = Runtime::new(RuntimeConfig { limits, ..RuntimeConfig::default() }).err().expect("refused");
        assert!(err.to_string().contains("actor"), "{err}");
    }
}

// ---- detokenize ------------------------------------------------------------------------------------------

#[test]
fn detokenizing_an_id_outside_the_vocabulary_traps_naming_it() {
    let rt = runtime(ActorLimits::default());
    rt.register_model("default", bundled());
    let wat = guest(
        1,
        r#"(data (i32.const 0) "default")
           (func (export "go") (param $id i32) (result i32) (local $m i32)
             (local.set $m (call $model_open (i32.const 0) (i32.const 7)))
             (i32.store (i32.const 64) (i32.const 1))
             (i32.store (i32.const 68) (local.get $id))
             (call $detokenize (local.get $m) (i32.const 64) (i32.const 2) (i32.const 0) (i32.const 1024) (i32.const 1024)))"#,
    );
    let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
    assert!(actor.call::<u32, i32>("go", 5).unwrap() > 0, "ids inside the vocabulary decode");
    for bad in [4096u32, u32::MAX] {
        match actor.call::<u32, i32>("go", bad) {
            Err(ActorError::Trap { message, .. }) => {
                assert!(message.starts_with("driftwood.detokenize"), "{message}");
                assert!(message.contains(&format!("token id {bad} (ids[1])")), "{message}");
                assert!(message.contains("4096-token vocabulary"), "{message}");
            }
            other => panic!("expected a trap for id {bad}, got {other:?}"),
        }
    }
}

// ---- Peak RSS of each reproduction, in a child process --------------------------------------------------

const SCENARIO: &str = "DRIFTWOOD_COST_SCENARIO";

/// Runs one reproduction when this binary is started for it (see [`peak_rss_of`]); otherwise nothing.
#[test]
fn reproduction_child() {
    let Ok(scenario) = std::env::var(SCENARIO) else { return };
    // The emitter's memory is 16 MiB; the others need a page or two.
    let cap = if scenario == "emit" { 16 * MIB } else { MIB };
    let rt = runtime(ActorLimits { memory_bytes: cap, deadline: Duration::from_secs(600), ..ActorLimits::default() });
    rt.register_model("default", bundled());
    let (before, _) = rss();
    match scenario.as_str() {
        "emit" => {
            let mut actor = rt.instantiate(emitter(64).as_bytes()).unwrap();
            expect_allowance_trap(actor.call::<(), ()>("go", ()), "driftwood.emit");
        }
        "logs" => {
            let wat = guest(
                2,
                r#"(func (export "go") (local $i i32)
                     (loop $l (if (i32.lt_u (local.get $i) (i32.const 4096)) (then
                       (call $log (i32.const 2) (i32.const 0) (i32.const 65536))
                       (local.set $i (i32.add (local.get $i) (i32.const 1)))
                       (br $l)))))"#,
            );
            let mut actor = rt.instantiate(wat.as_bytes()).unwrap();
            actor.call::<(), ()>("go", ()).unwrap();
        }
        "model_open" => {
            let mut actor = rt.instantiate(opener().as_bytes()).unwrap();
            assert_eq!(actor.call::<u32, i32>("go", 2_000_000).unwrap(), 0);
        }
        other => panic!("unknown scenario {other}"),
    }
    let (_, peak) = rss();
    println!("RSS-BEFORE {before} RSS-PEAK {peak} CAP {cap}");
}

/// Peak RSS of `scenario` run alone in a child process, minus the RSS before its actor was created; and the
/// actor's memory cap.
fn peak_rss_of(scenario: &str) -> (usize, usize) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "reproduction_child", "--nocapture", "--test-threads=1"])
        .env(SCENARIO, scenario)
        .output()
        .expect("the child runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{scenario}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| l.split("RSS-BEFORE").nth(1)).expect("the child reports its RSS");
    let v: Vec<usize> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let (before, peak, cap) = (v[0], v[1], v[2]);
    eprintln!(
        "{scenario}: RSS before {} MiB, peak {} MiB, growth {} MiB (cap {} MiB)",
        before / MIB,
        peak / MIB,
        peak.saturating_sub(before) / MIB,
        cap / MIB
    );
    (peak.saturating_sub(before), cap)
}

#[test]
fn each_reproduction_stays_under_the_cap_plus_64_mib() {
    for scenario in ["emit", "logs", "model_open"] {
        let (growth, cap) = peak_rss_of(scenario);
        assert!(growth < cap + 64 * MIB, "{scenario}: the process grew {} MiB", growth / MIB);
    }
}
