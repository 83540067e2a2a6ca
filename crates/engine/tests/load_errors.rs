//! A missing, corrupt or mismatched file is a clear error naming the file and what is wrong — never a panic.

use std::path::{Path, PathBuf};

use driftwood_engine::{EngineError, Model};

fn copy_case(case: &str) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden").join(case);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &mut |_| {}) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: PathBuf, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_files_are_named() {
    for (file, expect) in [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors"),
        ("tokenizer.json", "tokenizer.json"),
    ] {
        let dir = copy_case("llama2-f32");
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("has no") && e.contains(expect), "{file}: {e}");
    }
}

#[test]
fn truncated_and_garbage_weights_are_rejected() {
    let dir = copy_case("llama2-f32");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("not a valid safetensors file"), "{e}");
    std::fs::write(&path, b"").unwrap();
    assert!(load_err(dir.path()).contains("model.safetensors"));
}

#[test]
fn config_that_does_not_match_the_weights_names_the_tensor() {
    let dir = copy_case("llama2-f32");
    edit_json(dir.path().join("config.json"), |v| v["intermediate_size"] = 96.into());
    let e = load_err(dir.path());
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("config.json implies [96, 64]"), "{e}");

    let dir = copy_case("llama2-f32");
    edit_json(dir.path().join("config.json"), |v| v["num_hidden_layers"] = 3.into());
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.2") && e.contains("missing"), "{e}");
}

#[test]
fn bad_config_and_tokenizer_are_reported() {
    let dir = copy_case("llama2-f32");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("not a valid model config"), "{e}");

    let dir = copy_case("llama2-f32");
    edit_json(dir.path().join("config.json"), |v| v["architectures"] = serde_json::json!(["BertModel"]));
    assert!(load_err(dir.path()).contains("BertModel"));

    let dir = copy_case("llama2-f32");
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer.json") && e.contains("not a valid tokenizer"), "{e}");

    let dir = copy_case("llama2-f32");
    edit_json(dir.path().join("config.json"), |v| v["vocab_size"] = 10.into());
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer has") && e.contains("vocab_size is 10"), "{e}");
}

#[test]
fn sharded_weights_load_and_hostile_shard_names_are_refused() {
    let dir = copy_case("llama2-f32");
    let p = dir.path();
    std::fs::rename(p.join("model.safetensors"), p.join("model-00001-of-00001.safetensors")).unwrap();
    let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}});
    std::fs::write(p.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let model = Model::load(p, &mut |_| {}).expect("a one-shard index loads");
    assert_eq!(model.config().num_layers, 2);
    let hostile = serde_json::json!({"weight_map": {"x": "../../etc/passwd"}});
    std::fs::write(p.join("model.safetensors.index.json"), hostile.to_string()).unwrap();
    assert!(load_err(p).contains("plain file names"));
}

#[test]
fn requests_outside_the_model_are_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/llama2-f32");
    let model = Model::load(&dir, &mut |_| {}).unwrap();
    let dev = driftwood_backend::Device::cpu();
    let mut kv_mem = vec![0f32; model.kv_floats(4)];
    // SAFETY: kv_mem holds kv_floats(4) floats and is used only through `kv`.
    let mut kv = unsafe { driftwood_engine::KvCache::from_raw_parts(kv_mem.as_mut_ptr(), &model, 4) };
    let mut logits = vec![0f32; model.config().vocab_size];
    let mut s = driftwood_engine::Scratch::default();
    let mut run = |pos, tokens: &[u32]| {
        model.forward(&dev, &mut kv, pos, tokens, driftwood_backend::TensorMut::from_f32(&mut logits), &mut s)
    };
    assert!(matches!(run(0, &[]), Err(EngineError::Request(_))));
    assert!(matches!(run(3, &[1, 2]), Err(EngineError::Request(m)) if m.contains("exceeds")));
    assert!(matches!(run(0, &[100_000]), Err(EngineError::Request(m)) if m.contains("outside")));
    assert!(run(0, &[1, 2, 3, 4]).is_ok());
}
