//! `driftwood snapshot inspect FILE`: what a session or actor snapshot holds, after full validation
//! (structure, sizes, checksums). The file is recognised by its first bytes (an actor snapshot by its magic)
//! before any reader parses it, and both readers look before they allocate: a file whose header does not
//! account for its size is refused before its data is read, and the data is verified in bounded chunks, never
//! held whole.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use driftwood_snapshot::{ActorLimits, ActorReader, GlobalValue, SessionReader};
use serde_json::json;

/// Snapshot commands.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Validate a session (.safetensors) or actor snapshot and print its metadata, tokens and sizes.
    Inspect(InspectArgs),
}

/// Arguments of `driftwood snapshot inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The snapshot file.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Inspect(args) = cmd;
    // The first 8 bytes decide the reader: an actor snapshot is recognised by its magic before any parser runs.
    let mut magic = Vec::with_capacity(8);
    std::fs::File::open(&args.file)
        .and_then(|f| f.take(8).read_to_end(&mut magic))
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let report = if magic == driftwood_snapshot::actor::MAGIC {
        let file = ActorReader::open(&args.file, &ActorLimits { max_memory: 4 << 30 })
            .with_context(|| format!("{} is not a valid actor snapshot", args.file.display()))?;
        let image = file.image().clone();
        let (file_bytes, pages_stored) = (file.file_len(), file.page_count());
        file.verify().with_context(|| format!("{} is not a valid actor snapshot", args.file.display()))?;
        let globals: Vec<_> = image
            .globals
            .iter()
            .map(|(name, v)| {
                let value = match v {
                    GlobalValue::I32(x) => json!({"i32": x}),
                    GlobalValue::I64(x) => json!({"i64": x}),
                    GlobalValue::F32(b) => json!({"f32": f32::from_bits(*b)}),
                    GlobalValue::F64(b) => json!({"f64": f64::from_bits(*b)}),
                };
                json!({"name": name, "value": value})
            })
            .collect();
        json!({
            "kind": "actor",
            "file": args.file.display().to_string(),
            "file_bytes": file_bytes,
            "integrity": "ok (structure and BLAKE3 checksum verified)",
            "module_digest": image.module_digest,
            "abi_version": image.abi_version,
            "memory_bytes": image.memory_size,
            "pages_stored": pages_stored,
            "pages_total": image.memory_size / 4096,
            "globals": globals,
            "models": image.models.iter().map(|m| json!({
                "name": m.name, "model_fingerprint": m.model_fingerprint, "tokenizer_fingerprint": m.tokenizer_fingerprint
            })).collect::<Vec<_>>(),
            "metadata": image.metadata,
        })
    } else {
        let file = SessionReader::open(&args.file, None)
            .with_context(|| format!("{} is not a valid session snapshot", args.file.display()))?;
        let integrity = if file.version() >= 3 {
            "ok (structure, BLAKE3 checksum and per-tensor BLAKE3 digests verified)"
        } else {
            "ok (structure and BLAKE3 checksum verified)"
        };
        let report = json!({
            "kind": "session",
            "file": args.file.display().to_string(),
            "file_bytes": file.file_len(),
            "integrity": integrity,
            "version": file.version(),
            "metadata": file.meta(),
            "n_tokens": file.n_tokens(),
            "tokens": file.tokens(),
            "kv_dtype": file.kv_dtype().name(),
            "kv_bytes": file.kv_bytes(),
            "layers": file.num_layers(),
            "kv_heads": file.kv_heads(),
            "head_dim": file.head_dim(),
            "guest_state_bytes": file.guest_state().len(),
        });
        file.verify().with_context(|| format!("{} is not a valid session snapshot", args.file.display()))?;
        report
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (key, value) in report.as_object().into_iter().flatten() {
        let shown = match (key.as_str(), value) {
            ("tokens", serde_json::Value::Array(t)) if t.len() > 16 => {
                let head: Vec<String> = t[..8].iter().map(|x| x.to_string()).collect();
                let tail: Vec<String> = t[t.len() - 8..].iter().map(|x| x.to_string()).collect();
                format!("[{} … {}] ({} tokens)", head.join(", "), tail.join(", "), t.len())
            }
            (_, serde_json::Value::String(s)) => s.clone(),
            _ => value.to_string(),
        };
        println!("{key:<22} {shown}");
    }
    Ok(())
}
