//! Continuous batching: actors generating at the same time have their decode steps evaluated together, and
//! each generates exactly what it generates alone.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use driftwood_engine::Model;
use driftwood_host::{Actor, LogMode, Runtime, RuntimeConfig};

const PROMPTS: [&str; 4] = [
    "Once upon a time",
    "It is a truth universally acknowledged",
    "In the beginning God created",
    "Elizabeth said to her sister",
];
const TOKENS: u32 = 20;

fn runtime(model: Arc<Model>, batch_window: Option<Duration>) -> Runtime {
    let rt = Runtime::new(RuntimeConfig { log: LogMode::Capture, batch_window, ..RuntimeConfig::default() }).unwrap();
    rt.register_model("default", model);
    rt
}

/// A chat actor with `prompt` written into its memory; returns it and the prompt's (ptr, len).
fn actor_with_prompt(rt: &Runtime, prompt: &str) -> (Actor, u32, u32) {
    let mut actor = rt.instantiate(driftwood_actors::CHAT).unwrap();
    actor.call::<u32, ()>("init", 256).unwrap();
    let ptr: u32 = actor.call("alloc", prompt.len() as u32).unwrap();
    actor.write_text(ptr as usize, prompt.as_bytes()).unwrap();
    (actor, ptr, prompt.len() as u32)
}

/// Greedy generation (the chat actor's default sampling): the text and the actor's decode steps.
fn generate(actor: &mut Actor, ptr: u32, len: u32) -> (String, u64) {
    let n: i32 = actor.call("generate", (ptr, len, TOKENS)).unwrap();
    assert_eq!(n, TOKENS as i32);
    (actor.take_emitted(), actor.inference_stats().decode_tokens)
}

#[test]
fn concurrent_actors_are_batched_and_generate_what_they_generate_alone() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    let model = Arc::new(Model::load(&dir, &mut |_| {}).unwrap());

    let alone = runtime(model.clone(), None);
    let expected: Vec<(String, u64)> = PROMPTS
        .iter()
        .map(|p| {
            let (mut a, ptr, len) = actor_with_prompt(&alone, p);
            generate(&mut a, ptr, len)
        })
        .collect();
    assert_eq!(alone.batch_stats().passes, 0, "batching is off unless asked for");

    // The window only bounds how long a step waits for actors that are in a call but not yet decoding; it
    // is generous here so that a slow machine still gathers the actors.
    let rt = Arc::new(runtime(model, Some(Duration::from_millis(100))));
    let start = Arc::new(Barrier::new(PROMPTS.len()));
    let threads: Vec<_> = PROMPTS
        .iter()
        .map(|&p| {
            let (rt, start) = (rt.clone(), start.clone());
            std::thread::spawn(move || {
                let (mut a, ptr, len) = actor_with_prompt(&rt, p);
                start.wait();
                generate(&mut a, ptr, len)
            })
        })
        .collect();
    let together: Vec<(String, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    for ((p, got), want) in PROMPTS.iter().zip(&together).zip(&expected) {
        assert_eq!(got, want, "prompt {p:?}: batched generation differs from generating alone");
        assert_eq!(got.1, u64::from(TOKENS) - 1, "one decode step per generated token after the first");
    }
    let stats = rt.batch_stats();
    assert_eq!(stats.sequences, PROMPTS.len() as u64 * u64::from(TOKENS - 1), "every decode step went through");
    assert!(stats.batched_passes > 0 && stats.mean_size() > 1.0, "no step was batched: {stats:?}");
    assert!(stats.passes < stats.sequences);
    assert_eq!(stats.sizes.iter().sum::<u64>(), stats.passes);
    assert_eq!(stats.sizes[0], stats.passes - stats.batched_passes, "passes of one sequence");
    assert_eq!(rt.batch_window(), Some(Duration::from_millis(100)));
}

#[test]
fn a_step_that_cannot_run_traps_its_own_actor_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    let model = Arc::new(Model::load(&dir, &mut |_| {}).unwrap());
    let rt = Arc::new(runtime(model, Some(Duration::from_millis(100))));
    // kv at 65536 holds one token (max_seq 1); tokens at 16, logits at 32.
    let wat = r#"(module
        (import "driftwood" "model_open" (func $open (param i32 i32) (result i32)))
        (import "driftwood" "forward" (func $fwd (param i32 i32 i32 i32 i32 i32 i32 i32)))
        (memory (export "memory") 4)
        (data (i32.const 0) "default")
        (func (export "driftwood_abi_version") (result i32) i32.const 1)
        (func (export "step") (param $token i32) (param $pos i32) (drop (call $open (i32.const 0) (i32.const 7)))
            (i32.store (i32.const 16) (local.get $token))
            (call $fwd (i32.const 0) (i32.const 65536) (i32.const 0) (i32.const 1) (local.get $pos) (i32.const 16) (i32.const 1) (i32.const 32))))"#;
    let mut bad = rt.instantiate(wat.as_bytes()).unwrap();
    let mut trap = |token: u32, pos: u32| match bad.call::<(u32, u32), ()>("step", (token, pos)) {
        Err(driftwood_host::ActorError::Trap { message, .. }) => message,
        other => panic!("expected a trap, got {other:?}"),
    };
    let m = trap(999_999, 0);
    assert!(m.starts_with("driftwood.forward: token 999999 is outside"), "{m}");
    let m = trap(1, 1);
    assert!(m.contains("exceeds the 1 the KV cache holds"), "{m}");
    // A good step of the same actor, and a chat actor beside it, still run.
    bad.call::<(u32, u32), ()>("step", (1, 0)).unwrap();
    let (mut good, ptr, len) = actor_with_prompt(&rt, PROMPTS[0]);
    assert_eq!(generate(&mut good, ptr, len).1, u64::from(TOKENS) - 1);
    assert_eq!(rt.batch_stats().sequences, 1 + u64::from(TOKENS) - 1, "refused steps never reached a pass");
}

#[test]
fn actors_that_step_while_a_pass_runs_join_one_pass_not_a_queue_of_small_ones() {
    // A leader whose window ran out while a pass was running used to start a second, small pass behind it, and
    // the actors settled into small groups that alternate (a mean of about 4 sequences a pass with 64 actors).
    // A leader now gathers until the running pass ends and its window starts then, so the actors of one pass
    // step together in the next.
    const ACTORS: usize = 24;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    let model = Arc::new(Model::load(&dir, &mut |_| {}).unwrap());
    let rt = Arc::new(runtime(model, Some(Duration::from_millis(2))));
    let start = Arc::new(Barrier::new(ACTORS));
    let threads: Vec<_> = (0..ACTORS)
        .map(|i| {
            let (rt, start) = (rt.clone(), start.clone());
            std::thread::spawn(move || {
                let (mut a, ptr, len) = actor_with_prompt(&rt, PROMPTS[i % PROMPTS.len()]);
                start.wait();
                generate(&mut a, ptr, len)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().1, u64::from(TOKENS) - 1);
    }
    let stats = rt.batch_stats();
    assert_eq!(stats.sequences, ACTORS as u64 * u64::from(TOKENS - 1), "every decode step went through");
    // The first steps arrive as the prompts finish; after that whole groups step together.
    assert!(stats.mean_size() >= ACTORS as f64 / 3.0, "passes stayed small: {stats:?}");
}
