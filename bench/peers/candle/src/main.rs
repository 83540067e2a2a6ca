//! Decode-speed peer of `driftwood bench decode`: candle's Llama (candle-transformers) on the CPU.
//!
//! Loads a Hugging Face Llama model dir (config.json + model.safetensors) in the dtype the file
//! stores (F32 or BF16), prefills N context tokens in one forward pass, then times batch-1 greedy
//! decode steps and prints one JSON object per context on stdout:
//!
//! ```text
//! driftwood-bench-candle --model DIR --context 128,1024 [--steps 64] [--warmup 8]
//! ```
//!
//! The context tokens are `prompt_token(i)` below; `bench/peers/llama_cpp_decode.py` uses the same
//! formula, so `first_token` (the greedy token after the context) can be compared across engines.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

/// Exact version pinned in Cargo.toml.
const CANDLE_VERSION: &str = "0.11.1";

/// Deterministic pseudo-random context token `i` (also in llama_cpp_decode.py).
fn prompt_token(i: usize, vocab: usize) -> u32 {
    (17 + (i as u64 * 7919 + 104_729) % (vocab as u64 - 17)) as u32
}

struct Args {
    model: PathBuf,
    contexts: Vec<usize>,
    steps: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut contexts = vec![128, 1024];
    let mut steps = 64;
    let mut warmup = 8;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(val()?)),
            "--context" => {
                contexts = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().context("bad --context"))
                    .collect::<Result<_>>()?
            }
            "--steps" => steps = val()?.parse()?,
            "--warmup" => warmup = val()?.parse()?,
            "-h" | "--help" => {
                println!("driftwood-bench-candle --model DIR [--context 128,1024] [--steps 64] [--warmup 8]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        model: model.context("--model DIR is required")?,
        contexts,
        steps,
        warmup,
    })
}

/// The dtype the checkpoint stores its weights in (the token embedding's, read from the header).
fn file_dtype(path: &Path) -> Result<DType> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header)?;
    let header: serde_json::Value = serde_json::from_slice(&header)?;
    let dtype = header["model.embed_tokens.weight"]["dtype"].as_str().context("no model.embed_tokens.weight")?;
    Ok(match dtype {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        other => bail!("unsupported weight dtype {other}"),
    })
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0])
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let device = Device::Cpu;
    let cfg_text = std::fs::read_to_string(args.model.join("config.json"))
        .with_context(|| format!("reading {}/config.json", args.model.display()))?;
    let llama_cfg: LlamaConfig = serde_json::from_str(&cfg_text)?;
    let cfg = llama_cfg.into_config(false);
    let weights = args.model.join("model.safetensors");
    let dtype = file_dtype(&weights)?;

    let t0 = Instant::now();
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, &device)? };
    let model = Llama::load(vb, &cfg)?;
    let load_s = t0.elapsed().as_secs_f64();

    let dtype_name = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    };
    let threads = candle_core::utils::get_num_threads();

    for &n in &args.contexts {
        if n == 0 || n + args.warmup + args.steps > cfg.max_position_embeddings {
            bail!("context {n} + steps does not fit max_position_embeddings");
        }
        let mut cache = Cache::new(true, dtype, &cfg, &device)?;
        let prompt: Vec<u32> = (0..n).map(|i| prompt_token(i, cfg.vocab_size)).collect();

        let t = Instant::now();
        let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, 0, &mut cache)?;
        let first_token = argmax(&logits)?;
        let prefill_s = t.elapsed().as_secs_f64();

        let mut pos = n;
        let mut next = first_token;
        let mut step = |pos: &mut usize, next: &mut u32| -> Result<()> {
            let input = Tensor::new(&[*next], &device)?.unsqueeze(0)?;
            let logits = model.forward(&input, *pos, &mut cache)?;
            *next = argmax(&logits)?;
            *pos += 1;
            Ok(())
        };
        for _ in 0..args.warmup {
            step(&mut pos, &mut next)?;
        }
        let t = Instant::now();
        for _ in 0..args.steps {
            step(&mut pos, &mut next)?;
        }
        let decode_s = t.elapsed().as_secs_f64();

        let out = serde_json::json!({
            "peer": "candle",
            "version": format!("candle-core {CANDLE_VERSION} (candle-transformers llama, CPU, no MKL)"),
            "dtype": dtype_name,
            "context": n,
            "decode_tokens_per_s": args.steps as f64 / decode_s,
            "threads": threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "first_token": first_token,
            "prefill_s": prefill_s,
            "load_s": load_s,
        });
        println!("{out}");
    }
    Ok(())
}
