//! Inference inside actors: the default actor generates from the bundled model with its KV cache and logits
//! in its own memory, copies no tensor bytes, shares the weights with other actors, and the inference calls
//! reject bad ranges like every host call.

use std::path::Path;
use std::sync::Arc;

use driftwood_backend::DType;
use driftwood_engine::Model;
use driftwood_host::{Actor, ActorError, LogMode, Runtime, RuntimeConfig};

fn bundled() -> Arc<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    Arc::new(Model::load(&dir, &mut |_| {}).expect("the bundled model loads"))
}

fn runtime(model: Arc<Model>) -> Runtime {
    let rt = Runtime::new(RuntimeConfig { log: LogMode::Capture, ..RuntimeConfig::default() }).unwrap();
    rt.register_model("default", model);
    rt
}

fn chat_actor(rt: &Runtime, max_seq: u32) -> Actor {
    let mut actor = rt.instantiate(driftwood_actors::CHAT).unwrap();
    actor.call::<u32, ()>("init", max_seq).unwrap();
    actor
}

fn request(actor: &mut Actor, export: &str, text: &str, max_tokens: u32) -> (i32, String) {
    let ptr: u32 = actor.call("alloc", text.len() as u32).unwrap();
    actor.write_text(ptr as usize, text.as_bytes()).unwrap();
    let n: i32 = actor.call(export, (ptr, text.len() as u32, max_tokens)).unwrap();
    (n, actor.take_emitted())
}

#[test]
fn greedy_generation_is_deterministic_and_copies_no_tensor_bytes() {
    let rt = runtime(bundled());
    let mut a = chat_actor(&rt, 256);
    let (n, text) = request(&mut a, "generate", "Once upon a time", 24);
    assert_eq!(n, 24);
    assert!(text.split_whitespace().count() >= 8, "expected words, got {text:?}");
    let stats = a.inference_stats();
    assert_eq!(stats.decode_tokens, 23, "one decode step per generated token after the first");
    // Prompt, pieces and token ids are text; KV cache and logits were never copied.
    assert_eq!(a.ledger().tensor_bytes, 0);
    let mut b = chat_actor(&rt, 256);
    assert_eq!(request(&mut b, "generate", "Once upon a time", 24).1, text);
}

#[test]
fn seeded_sampling_repeats_and_seeds_differ() {
    let rt = runtime(bundled());
    let sample = |seed: u64| {
        let mut a = chat_actor(&rt, 256);
        a.call::<(f32, u32, f32, f32, f32, u64), ()>("set_sampling", (1.0, 40, 0.95, 0.0, 1.0, seed)).unwrap();
        request(&mut a, "generate", "The king said", 32).1
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
}

#[test]
fn chat_turns_reuse_the_cache_and_only_evaluate_new_tokens() {
    let rt = runtime(bundled());
    let mut a = chat_actor(&rt, 1024);
    let (n1, reply1) = request(&mut a, "chat", "Tell me about the king.", 16);
    assert!(n1 > 0 && !reply1.is_empty());
    let first_prompt: u32 = a.call("stat", 0).unwrap();
    let (_, _) = request(&mut a, "chat", "And the queen?", 16);
    let prompt2: u32 = a.call("stat", 0).unwrap();
    let evaluated2: u32 = a.call("stat", 1).unwrap();
    assert!(prompt2 > first_prompt);
    assert!(evaluated2 < prompt2 / 2, "turn 2 evaluated {evaluated2} of {prompt2} prompt tokens");
    assert_eq!(a.call::<(), u32>("turns", ()).unwrap(), 4);
}

#[test]
fn actors_share_one_copy_of_the_weights() {
    let model = bundled();
    let weight_bytes = model.weight_bytes_per_token();
    let rt = runtime(model.clone());
    let rss = || driftwood_memory::rss::resident_bytes().unwrap() as i64;
    let mut actors = vec![chat_actor(&rt, 64)];
    request(&mut actors[0], "generate", "Once", 4);
    let before = rss();
    for _ in 0..8 {
        let mut a = chat_actor(&rt, 64);
        request(&mut a, "generate", "Once", 4);
        actors.push(a);
    }
    let per_actor = (rss() - before) / 8;
    assert!(per_actor < weight_bytes as i64 / 4, "each actor added {per_actor} bytes; weights are {weight_bytes}");
    // One model, referenced (not copied) by the registry, this test and each actor that opened it.
    assert_eq!(Arc::strong_count(&model), 2 + actors.len());
}

#[test]
fn forward_rejects_bad_ranges_and_tokens() {
    let rt = runtime(bundled());
    let wat = r#"(module
        (import "driftwood" "model_open" (func $open (param i32 i32) (result i32)))
        (import "driftwood" "forward" (func $fwd (param i32 i32 i32 i32 i32 i32 i32 i32)))
        (memory (export "memory") 4)
        (data (i32.const 0) "default")
        (func (export "driftwood_abi_version") (result i32) i32.const 1)
        (func (export "kv_oob") (drop (call $open (i32.const 0) (i32.const 7)))
            (call $fwd (i32.const 0) (i32.const 1024) (i32.const 0) (i32.const 64) (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 2048)))
        (func (export "bad_token") (drop (call $open (i32.const 0) (i32.const 7)))
            (i32.store (i32.const 16) (i32.const 999999))
            (call $fwd (i32.const 0) (i32.const 65536) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 32)))
        (func (export "no_model")
            (call $fwd (i32.const 5) (i32.const 65536) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 32)))
        (func (export "bad_kv_dtype") (drop (call $open (i32.const 0) (i32.const 7)))
            (call $fwd (i32.const 0) (i32.const 65536) (i32.const 2) (i32.const 1) (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 32)))
        (func (export "misaligned_kv") (drop (call $open (i32.const 0) (i32.const 7)))
            (call $fwd (i32.const 0) (i32.const 65544) (i32.const 1) (i32.const 1) (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 32)))
        (func (export "unknown_model") (drop (call $open (i32.const 1) (i32.const 3)))))"#;
    let mut a = rt.instantiate(wat.as_bytes()).unwrap();
    let msg = |a: &mut Actor, export: &str| match a.call::<(), ()>(export, ()) {
        Err(ActorError::Trap { message, .. }) => message,
        other => panic!("{export}: expected a trap, got {other:?}"),
    };
    let m = msg(&mut a, "kv_oob");
    assert!(m.starts_with("driftwood.forward: operand `kv`") && m.contains("outside"), "{m}");
    let m = msg(&mut a, "bad_token");
    assert!(m.contains("token 999999 is outside"), "{m}");
    let m = msg(&mut a, "no_model");
    assert!(m.contains("model handle 5"), "{m}");
    let m = msg(&mut a, "bad_kv_dtype");
    assert!(m.contains("kv dtype code 2 is not a KV dtype"), "{m}");
    let m = msg(&mut a, "misaligned_kv");
    assert!(m.contains("operand `kv` at 0x10008 is not 16-byte aligned"), "{m}");
    let m = msg(&mut a, "unknown_model");
    assert!(m.contains("no model named `efa`") && m.contains("default"), "{m}");
}

#[test]
fn hibernated_actor_wakes_and_continues_exactly() {
    let rt = runtime(bundled());
    let store = driftwood_host::ActorStore::open(tempfile::tempdir().unwrap().keep()).unwrap();
    let mut awake = chat_actor(&rt, 256);
    a_sampling(&mut awake);
    let mut sleeper = chat_actor(&rt, 256);
    a_sampling(&mut sleeper);
    request(&mut awake, "generate", "It is a truth", 10);
    request(&mut sleeper, "generate", "It is a truth", 10);
    let live_before = rt.live_regions();
    let mut sleeper = Some(sleeper);
    let info = store.hibernate("s-1", &mut sleeper).unwrap();
    assert!(sleeper.is_none());
    assert!(info.file_bytes < info.memory_bytes, "only non-zero pages are stored");
    assert_eq!(rt.live_regions(), live_before - 1, "hibernation releases the actor's memory");
    assert_eq!(store.ids(), vec!["s-1".to_string()]);
    let mut woken = store.wake(&rt, "s-1", driftwood_actors::CHAT).unwrap();
    let continued: i32 = woken.call("resume", 12u32).unwrap();
    let reference: i32 = awake.call("resume", 12u32).unwrap();
    assert_eq!(continued, reference);
    assert_eq!(woken.take_emitted(), awake.take_emitted());
    assert!(store.wake(&rt, "../etc", driftwood_actors::CHAT).is_err());
    assert!(store.wake(&rt, "missing", driftwood_actors::CHAT).is_err());
}

#[test]
fn an_actor_snapshot_held_in_memory_restores_and_continues_exactly() {
    let rt = runtime(bundled());
    let mut awake = chat_actor(&rt, 256);
    a_sampling(&mut awake);
    request(&mut awake, "generate", "It is a truth", 10);
    let mut bytes = Vec::new();
    let stats = awake.write_snapshot_to(&mut bytes, Default::default()).unwrap();
    assert_eq!(stats.bytes, bytes.len() as u64);
    let mut woken = rt.restore_actor_bytes(bytes.clone(), driftwood_actors::CHAT).unwrap();
    let continued: i32 = woken.call("resume", 12u32).unwrap();
    let reference: i32 = awake.call("resume", 12u32).unwrap();
    assert_eq!(continued, reference);
    assert_eq!(woken.take_emitted(), awake.take_emitted());
    // A flipped byte anywhere after the fixed header fails the checksum before any instance exists.
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let refused = rt.restore_actor_bytes(bytes, driftwood_actors::CHAT).err().expect("refused");
    assert!(refused.to_string().contains("checksum"), "{refused}");
}

fn a_sampling(a: &mut Actor) {
    a.call::<(f32, u32, f32, f32, f32, u64), ()>("set_sampling", (0.8, 40, 0.95, 0.05, 1.1, 3)).unwrap();
}

#[test]
fn session_saves_finish_in_the_background_in_order_and_report_failures() {
    let rt = runtime(bundled());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    let mut a = chat_actor(&rt, 128);
    request(&mut a, "generate", "It is a truth", 6);
    a.set_session_file(&file);
    let first: i32 = a.call("save_session", ()).unwrap();
    assert!(first > 0, "{:?}", a.take_host_error());
    a.settle_session_saves().unwrap();
    let saved = std::fs::read(&file).unwrap();
    // A second save lands after the first: once settled, the file holds the longer session.
    request(&mut a, "chat", "More.", 4);
    let second: i32 = a.call("save_session", ()).unwrap();
    assert!(second > first);
    a.settle_session_saves().unwrap();
    assert_ne!(std::fs::read(&file).unwrap(), saved);
    let mut b = chat_actor(&rt, 128);
    b.set_session_file(&file);
    assert_eq!(b.call::<(), i32>("load_session", ()).unwrap(), second);

    // A save that cannot be made durable (its directory is gone) is reported by the next settle, and the
    // actor's next save refuses to run ahead of it.
    let gone = tempfile::tempdir().unwrap();
    a.set_session_file(gone.path().join("s.safetensors"));
    let gone_path = gone.path().to_path_buf();
    drop(gone);
    assert!(!gone_path.exists());
    let _: i32 = a.call("save_session", ()).unwrap();
    let err = a.settle_session_saves().unwrap_err().to_string();
    assert!(err.contains("did not complete") && err.contains("s.safetensors"), "{err}");
    // Settled means reported once: the actor can save again elsewhere.
    a.set_session_file(&file);
    assert!(a.call::<(), i32>("save_session", ()).unwrap() > 0);
    drop(a); // dropping settles the last save
    assert_eq!(b.call::<(), i32>("load_session", ()).unwrap(), second);
}

fn runtime_with_kv(model: Arc<Model>, kv_dtype: DType) -> Runtime {
    let config = RuntimeConfig { log: LogMode::Capture, kv_dtype: Some(kv_dtype), ..RuntimeConfig::default() };
    let rt = Runtime::new(config).unwrap();
    rt.register_model("default", model);
    rt
}

#[test]
fn bf16_kv_caches_generate_and_their_sessions_resume_under_either_dtype() {
    let model = bundled();
    let (f32_rt, bf16_rt) = (runtime_with_kv(model.clone(), DType::F32), runtime_with_kv(model, DType::BF16));
    assert_eq!(bf16_rt.kv_dtype(), DType::BF16);
    // The same greedy text with either cache (the bundled model's logits move by < 0.2 % with bf16 K/V).
    let mut a = chat_actor(&bf16_rt, 256);
    let (_, text) = request(&mut a, "generate", "Once upon a time", 24);
    let mut reference = chat_actor(&f32_rt, 256);
    assert_eq!(request(&mut reference, "generate", "Once upon a time", 24).1, text);
    assert_eq!(a.ledger().tensor_bytes, 0, "a bf16 cache is computed on in place too");

    // A bf16 session saved, then resumed by a bf16 actor (exactly: bf16 → f32 file → bf16) and by an f32
    // actor: each continues the conversation as the actor that saved it does.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    a.set_session_file(&file);
    let saved: i32 = a.call("save_session", ()).unwrap();
    assert!(saved > 0, "{:?}", a.take_host_error());
    a.settle_session_saves().unwrap();
    let (_, expected) = request(&mut a, "chat", "And then?", 12);
    for rt in [&bf16_rt, &f32_rt] {
        let mut b = chat_actor(rt, 256);
        b.set_session_file(&file);
        assert_eq!(b.call::<(), i32>("load_session", ()).unwrap(), saved, "{:?}", b.take_host_error());
        assert_eq!(request(&mut b, "chat", "And then?", 12).1, expected, "{} KV resumed", rt.kv_dtype());
    }
}
