//! `driftwood bench readme`: rewrites the README's benchmark tables from `bench/results/*.json`.
//!
//! Each table lives between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; everything else in the
//! README is left alone.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

/// Arguments of `driftwood bench readme`.
#[derive(clap::Args, Debug)]
pub struct ReadmeArgs {
    /// Folder holding the result files.
    #[arg(long, default_value = "bench/results")]
    results: PathBuf,
    /// README to rewrite.
    #[arg(long, default_value = "README.md")]
    readme: PathBuf,
}

fn load(args: &ReadmeArgs, name: &str) -> anyhow::Result<Value> {
    let path = args.results.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn provenance(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let cpu = v.pointer("/machine/cpu").and_then(Value::as_str).unwrap_or("?");
    let threads = v.pointer("/machine/threads").and_then(Value::as_u64).unwrap_or(0);
    format!("\n_{cpu}, {threads} threads; commit `{}`; `{}`_\n", s("commit"), s("command"))
}

fn abi_table(v: &Value) -> String {
    let r = &v["results"];
    let mut t =
        String::from("| call | from wasm | native | boundary cost | boundary share |\n|---|---:|---:|---:|---:|\n");
    t += &format!(
        "| no-op host call | {:.1} ns | — | {:.1} ns | — |\n",
        num(&r["noop"], "wasm_ns_per_call"),
        num(&r["noop"], "wasm_ns_per_call")
    );
    for row in r["matmul_f32"].as_array().into_iter().flatten() {
        t += &format!(
            "| matmul {n}³ f32 | {:.3} ms | {:.3} ms | {:.2} µs | {:.4} % |\n",
            num(row, "wasm_ms"),
            num(row, "native_ms"),
            num(row, "call_cost_us"),
            num(row, "overhead_share_pct"),
            n = num(row, "n"),
        );
    }
    t + &provenance(v)
}

fn matmul_table(v: &Value) -> String {
    let mut t = String::from(
        "| n | driftwood f32 | driftwood bf16 | `gemm` crate f32 | `matrixmultiply` f32 |\n|---:|---:|---:|---:|---:|\n",
    );
    for row in v["results"]["rows"].as_array().into_iter().flatten() {
        t += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            num(row, "n"),
            num(row, "driftwood_f32_gflops"),
            num(row, "driftwood_bf16_gflops"),
            num(row, "gemm_crate_f32_gflops"),
            num(row, "matrixmultiply_f32_gflops"),
        );
    }
    t + "\nGFLOP/s, median of interleaved repetitions.\n" + &provenance(v)
}

fn decode_table(v: &Value) -> String {
    let rows: Vec<&Value> = v["results"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let mut engines: Vec<String> = vec![];
    for r in &rows {
        let e = r["engine"].as_str().unwrap_or("?").to_string();
        if !engines.contains(&e) {
            engines.push(e);
        }
    }
    let mut t =
        format!("| weights | context | {} |\n|---|---:|{}\n", engines.join(" | "), "---:|".repeat(engines.len()));
    let mut keys: Vec<(String, u64)> = vec![];
    for r in &rows {
        let k = (r["dtype"].as_str().unwrap_or("?").to_string(), r["context"].as_u64().unwrap_or(0));
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (dtype, context) in keys {
        let cells: Vec<String> = engines
            .iter()
            .map(|e| {
                rows.iter()
                    .find(|r| r["engine"] == e.as_str() && r["dtype"] == dtype.as_str() && r["context"] == context)
                    .and_then(|r| r["decode_tokens_per_s"].as_f64())
                    .map_or("—".into(), |x| format!("{x:.1}"))
            })
            .collect();
        t += &format!("| {dtype} | {context} | {} |\n", cells.join(" | "));
    }
    if let Some(roof) = v.pointer("/roofline") {
        t += &format!(
            "\nRoofline: {} weight bytes per token at a measured {:.1} GB/s read bandwidth.\n",
            roof["weight_bytes_per_token"],
            num(roof, "read_bandwidth_gb_s")
        );
    }
    t + "\nDecode tokens/s at batch 1, higher is better.\n" + &provenance(v)
}

fn snapshot_table(v: &Value) -> String {
    let mut t = String::from(
        "| context | file | save | save, durable | restore | re-prefill | restore speedup |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in v["results"]["rows"].as_array().into_iter().flatten() {
        t += &format!(
            "| {} | {:.2} MB | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} ms | {:.0}× |\n",
            num(row, "context"),
            num(row, "file_bytes") / 1e6,
            num(row, "save_ms"),
            num(row, "save_durable_ms"),
            num(row, "restore_ms"),
            num(row, "reprefill_ms"),
            num(row, "speedup"),
        );
    }
    let model = v["results"]["model"].as_str().unwrap_or("?");
    t + &format!(
        "\nModel `{model}`; medians. *save*: until `session_save` returns to the actor (the snapshot copied out \
         of its memory, or written from it to a temporary file); *save, durable*: until it is fsynced and renamed into place (on a background thread).\n"
    ) + &provenance(v)
}

fn density_table(v: &Value, f32_kv: Option<&Value>) -> String {
    let r = &v["results"];
    let mib = |k: &str| num(r, k) / 1048576.0;
    let kv = r["kv_dtype"].as_str().unwrap_or("?");
    let mut t = format!(
        "| | per actor | actors in {} MiB |\n|---|---:|---:|\n| zero-copy (KV only in the actor) | {:.1} MiB | {} |\n| \
         copy path (second KV copy on the host) | {:.1} MiB | {} |\n| hibernated (on disk) | {:.1} MiB | wake p50 {:.2} \
         ms, p99 {:.2} ms over {} actors |\n| woken (resident after wake) | {:.1} MiB | {:.2}× the snapshot's stored \
         bytes |\n\n{}-token contexts, {kv} KV ({} bytes per token), {:.2}× more live actors zero-copy.",
        num(r, "budget_mib"),
        mib("zero_copy_bytes_per_actor"),
        num(r, "zero_copy_actors_in_budget"),
        mib("copy_path_bytes_per_actor"),
        num(r, "copy_path_actors_in_budget"),
        mib("hibernated_bytes_per_actor"),
        num(r, "wake_ms_p50"),
        num(r, "wake_ms_p99"),
        num(r, "hibernated_actors"),
        num(r, "woken_resident_bytes_per_actor") / 1048576.0,
        num(r, "woken_resident_to_stored"),
        num(r, "context"),
        num(r, "kv_bytes_per_token"),
        num(r, "density_ratio"),
    );
    if let Some(f) = f32_kv {
        let f = &f["results"];
        t += &format!(
            " With an f32 cache (`--kv-dtype f32`): {} KV bytes per token, {:.1} MiB per live actor, {} actors in the budget.",
            num(f, "kv_bytes_per_token"),
            num(f, "zero_copy_bytes_per_actor") / 1048576.0,
            num(f, "zero_copy_actors_in_budget"),
        );
    }
    t + "\n" + &provenance(v)
}

/// The CUDA backend on the Llama-3.2-1B-shaped model, with the PyTorch peers of the same run's device.
fn gpu_table(v: &Value, peers_decode: Option<&Value>, peers_batched: Option<&Value>) -> String {
    let r = &v["results"];
    let mut t = String::from("| | ms/token (batch 1) | vs floor |\n|---|---:|---:|\n");
    let floor = num(r, "floor_ms_per_token");
    for run in r["runs"].as_array().into_iter().flatten() {
        let ms = num(run, "decode_ms_per_token");
        t += &format!(
            "| Driftwood, {} actor memory | {ms:.3} | {:.0} % of bandwidth |\n",
            run["placement"].as_str().unwrap_or("?"),
            100.0 * floor / ms
        );
    }
    if let Some(p) = peers_decode {
        let eager = num(&p["eager"], "decode_ms_per_token");
        let graph = num(&p["static_graph"], "decode_ms_per_token");
        t += &format!("| transformers eager | {eager:.3} | {:.0} % |\n", 100.0 * floor / eager);
        t += &format!(
            "| PyTorch static cache + CUDA graph (compiled) | {graph:.3} | {:.0} % |\n",
            100.0 * floor / graph
        );
    }
    t += &format!(
        "\nFloor {floor:.3} ms/token = {:.2} GB of weights / {:.0} GB/s measured device copy bandwidth ({}).\n",
        num(r, "weight_bytes_per_token") / 1e9,
        num(r, "copy_bandwidth_gb_s"),
        r["device"].as_str().unwrap_or("?")
    );
    t += &batch_table(r, peers_batched);
    let g = &r["golden"];
    if g.is_object() {
        t += &format!(
            "\nAgainst transformers on the same weights ({}-token prompt): max |Δ| over its top-64 logits {:.1e} \
             (float32 compute) and {:.3} (bf16 compute); greedy tokens equal for {} of {}.\n",
            num(g, "prompt_tokens"),
            num(g, "max_abs_diff_top64_vs_f32"),
            num(g, "max_abs_diff_top64_vs_bf16"),
            num(g, "greedy_equal_f32"),
            num(g, "greedy_compared")
        );
    }
    t + &provenance(v)
}

/// Where the README links the batch-scaling curve that `bench/plot.sh` draws (relative to the README).
const SCALING_PNG: &str = "bench/results/gpu-scaling.png";

/// The batched sweep of `gpu-cuda.json` (`results.batched`: one run per batch size; an object in older files)
/// next to the PyTorch batched peer at the same batch sizes, and the link to the curve.
fn batch_table(r: &Value, peers_batched: Option<&Value>) -> String {
    let runs: Vec<&Value> = match &r["batched"] {
        Value::Array(a) => a.iter().collect(),
        b @ Value::Object(_) => vec![b],
        _ => vec![],
    };
    if runs.is_empty() {
        return String::new();
    }
    let peer = |batch: f64| {
        peers_batched
            .and_then(|p| p["results"].as_array())
            .and_then(|rows| rows.iter().find(|x| num(x, "batch") == batch))
    };
    let mut t = String::from(
        "\n| actors (batch) | Driftwood tokens/s | ms/step | roofline tokens/s | % of roofline | PyTorch compiled \
         tokens/s | ratio | greedy = CPU |\n|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for b in &runs {
        let (batch, ours) = (num(b, "batch"), num(b, "tokens_per_s"));
        let roof = num(b, "roofline_tokens_per_s");
        let (torch, ratio) = match peer(batch) {
            Some(x) => {
                let tps = num(x, "tokens_per_s");
                // The headline is the faster variant; say so when that is not the compiled one.
                let variant =
                    x["variant"].as_str().filter(|v| *v != "compiled").map_or(String::new(), |v| format!(" ({v})"));
                (format!("{tps:.0}{variant}"), format!("{:.2}×", ours / tps))
            }
            None => ("—".into(), "—".into()),
        };
        let greedy = match (b["greedy_tokens_equal_cpu"].as_u64(), b["greedy_tokens_compared"].as_u64()) {
            (Some(equal), Some(compared)) => {
                let seqs = b["greedy_checked_seqs"].as_array().map_or(0, Vec::len);
                let gap = b["cpu_top2_gap_at_divergence"]
                    .as_f64()
                    .map_or(String::new(), |g| format!("; parts where the CPU's top-2 gap is {g:.3}"));
                let seqs = if seqs == 1 { "1 sequence".to_string() } else { format!("{seqs} sequences") };
                format!("{equal} of {compared} ({seqs}{gap})")
            }
            _ => "—".into(),
        };
        t += &format!(
            "| {batch} | {ours:.0} | {:.2} | {roof:.0} | {:.0} % | {torch} | {ratio} | {greedy} |\n",
            num(b, "step_ms"),
            100.0 * ours / roof,
        );
    }
    t += &format!(
        "\nBatched decode: that many actors (managed memory), each with a {}-token context, step together; median \
         step time. Roofline: the weights once plus every sequence's bf16 KV per step at the measured copy \
         bandwidth. PyTorch: the same model with a static cache, the step compiled (torch.compile) and replayed \
         as a CUDA graph (`bench/peers/torch_batched.py`; its faster variant, named when not the compiled one); \
         ratio: Driftwood over PyTorch. Greedy = CPU: leading greedy tokens equal to the CPU backend's, fewest \
         over sequences 0, B/2 and B−1 of a batch of fresh 8-token prompts.\n\n\
         ![Decode tokens/s against batch size]({SCALING_PNG})\n",
        num(runs[0], "context")
    );
    t
}

/// GPU prefill from position 0 (last token's logits only): ours per placement next to transformers and the
/// static-cache PyTorch prefill, from `gpu-cuda.json` and `peers-torch-prefill-cuda.json`.
fn prefill_table(gpu: &Value, peers: Option<&Value>) -> String {
    let runs: Vec<&Value> = gpu["results"]["prefill"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let peer = |tokens: u64, key: &str| {
        peers
            .and_then(|p| p["prefill"].as_array())
            .and_then(|rows| rows.iter().find(|r| r["tokens"].as_u64() == Some(tokens)))
            .map_or(f64::NAN, |r| num(r, key))
    };
    let ours = |tokens: u64, placement: &str| {
        runs.iter().find(|r| r["tokens"].as_u64() == Some(tokens) && r["placement"] == placement).copied()
    };
    let mut tokens: Vec<u64> = runs.iter().filter_map(|r| r["tokens"].as_u64()).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let mut t = String::from(
        "| prompt tokens | Driftwood, pinned | TFLOP/s | Driftwood, managed | transformers (bf16, SDPA) | PyTorch static \
         cache | vs transformers |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for n in tokens {
        let pinned = ours(n, "pinned");
        let managed = ours(n, "managed");
        let ms = |r: Option<&Value>| r.map_or("—".into(), |r| format!("{:.2} ms", num(r, "ms")));
        let hf = peer(n, "transformers_ms");
        let best = [pinned, managed].iter().flatten().map(|r| num(r, "ms")).fold(f64::INFINITY, f64::min);
        t += &format!(
            "| {n} | {} | {} | {} | {hf:.2} ms | {:.2} ms | {:.1}× |
",
            ms(pinned),
            pinned.map_or("—".into(), |r| format!("{:.0}", num(r, "tflops"))),
            ms(managed),
            peer(n, "static_ms"),
            hf / best,
        );
    }
    t + "
Medians; ours timed on the host clock around the call an actor makes (the last token's logits land in \
         its memory), the peers with CUDA events around `model(ids, use_cache=True, logits_to_keep=1)`.
" + &provenance(gpu)
}

/// GPU session restore per placement next to our own re-prefill and `safetensors.torch.load_file` of the same
/// KV onto the GPU, from `snapshot-cuda.json`, `snapshot-cuda-managed.json` and the torch prefill peer.
fn snapshot_gpu_table(pinned: &Value, managed: Option<&Value>, peers: Option<&Value>) -> String {
    let rows = |v: Option<&Value>| -> Vec<Value> {
        v.and_then(|v| v["results"]["rows"].as_array().cloned()).unwrap_or_default()
    };
    let (pinned_rows, managed_rows) = (rows(Some(pinned)), rows(managed));
    let mut t = String::from(
        "| context | file | restore, pinned | restore, managed | effective GB/s | re-prefill |          safetensors → GPU (peer) | save, durable |
|---:|---:|---:|---:|---:|---:|---:|---:|
",
    );
    for row in &pinned_rows {
        let context = row["context"].as_u64();
        let m = managed_rows.iter().find(|r| r["context"].as_u64() == context);
        let peer = peers
            .and_then(|p| p["restore"].as_array())
            .and_then(|a| a.iter().find(|r| r["tokens"].as_u64() == context))
            .map_or(f64::NAN, |r| num(r, "safetensors_load_cuda_ms"));
        let best = num(row, "restore_ms").min(m.map_or(f64::INFINITY, |m| num(m, "restore_ms")));
        t += &format!(
            "| {} | {:.1} MB | {:.2} ms | {} | {:.1} | {:.1} ms | {peer:.2} ms | {:.1} ms |\n",
            num(row, "context"),
            num(row, "file_bytes") / 1e6,
            num(row, "restore_ms"),
            m.map_or("—".into(), |m| format!("{:.2} ms", num(m, "restore_ms"))),
            num(row, "file_bytes") / best / 1e6,
            num(row, "reprefill_ms"),
            num(row, "save_durable_ms"),
        );
    }
    t + "\nbf16 KV, format v3 (per-tensor BLAKE3 verified as it is read); medians. *restore*: `session_load` in \
         the actor from a file in the page cache, checksums included, until the KV is in its memory (managed: and \
         prefetched to the GPU); *re-prefill*: the same tokens through our GPU prefill; the peer loads the same \
         bf16 KV tensors with `safetensors.torch.load_file(path, device=\"cuda\")`.\n"
        + &provenance(pinned)
}

fn replace_between(doc: &str, name: &str, body: &str) -> anyhow::Result<String> {
    let (open, close) = (format!("<!-- bench:{name} -->"), format!("<!-- /bench:{name} -->"));
    let (Some(start), Some(end)) = (doc.find(&open), doc.find(&close)) else {
        bail!("the README has no `{open}` … `{close}` markers");
    };
    if end < start {
        bail!("`{close}` comes before `{open}` in the README");
    }
    Ok(format!("{}{open}\n{body}{}", &doc[..start], &doc[end..]))
}

pub fn run(args: &ReadmeArgs) -> anyhow::Result<()> {
    let mut doc =
        std::fs::read_to_string(&args.readme).with_context(|| format!("cannot read {}", args.readme.display()))?;
    doc = replace_between(&doc, "abi", &abi_table(&load(args, "abi-cpu")?))?;
    doc = replace_between(&doc, "matmul", &matmul_table(&load(args, "matmul-cpu")?))?;
    if let Ok(decode) = load(args, "decode-cpu") {
        doc = replace_between(&doc, "decode", &decode_table(&decode))?;
    }
    if let Ok(snapshot) = load(args, "snapshot-cpu") {
        doc = replace_between(&doc, "snapshot", &snapshot_table(&snapshot))?;
    }
    if let Ok(gpu) = load(args, "gpu-cuda") {
        let (d, b) = (load(args, "peers-torch-decode-cuda").ok(), load(args, "peers-torch-batched-cuda").ok());
        doc = replace_between(&doc, "gpu", &gpu_table(&gpu, d.as_ref(), b.as_ref()))?;
        if gpu["results"]["prefill"].as_array().is_some_and(|a| !a.is_empty()) {
            let peers = load(args, "peers-torch-prefill-cuda").ok();
            doc = replace_between(&doc, "gpu-prefill", &prefill_table(&gpu, peers.as_ref()))?;
        }
    }
    if let Ok(snapshot) = load(args, "snapshot-cuda") {
        let managed = load(args, "snapshot-cuda-managed").ok();
        let peers = load(args, "peers-torch-prefill-cuda").ok();
        doc = replace_between(&doc, "snapshot-gpu", &snapshot_gpu_table(&snapshot, managed.as_ref(), peers.as_ref()))?;
    }
    if let Ok(density) = load(args, "density-cpu") {
        let f32_kv = load(args, "density-cpu-f32kv").ok();
        doc = replace_between(&doc, "density", &density_table(&density, f32_kv.as_ref()))?;
    }
    std::fs::write(&args.readme, doc).with_context(|| format!("cannot write {}", args.readme.display()))?;
    eprintln!("updated {}", args.readme.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn batch_table_rows_per_batch_size_with_peers_by_batch() {
        let r = json!({"batched": [
            {"batch": 1, "context": 1024, "step_ms": 1.5, "tokens_per_s": 666.7, "roofline_tokens_per_s": 1600.0,
             "greedy_checked_seqs": [0], "greedy_tokens_equal_cpu": 8, "greedy_tokens_compared": 8,
             "cpu_top2_gap_at_divergence": null},
            {"batch": 64, "context": 1024, "step_ms": 2.84, "tokens_per_s": 22561.0, "roofline_tokens_per_s": 58729.0,
             "greedy_checked_seqs": [0, 32, 63], "greedy_tokens_equal_cpu": 5, "greedy_tokens_compared": 8,
             "cpu_top2_gap_at_divergence": 0.01}
        ]});
        let peers = json!({"results": [
            {"batch": 64, "tokens_per_s": 26307.8, "variant": "compiled"},
            {"batch": 1, "tokens_per_s": 800.0, "variant": "plain"}
        ]});
        let t = batch_table(&r, Some(&peers));
        assert!(t.contains("| 1 | 667 | 1.50 | 1600 | 42 % | 800 (plain) | 0.83× | 8 of 8 (1 sequence) |"), "{t}");
        assert!(t.contains("| 64 | 22561 | 2.84 | 58729 | 38 % | 26308 | 0.86× | 5 of 8 (3 sequences; parts"), "{t}");
        assert!(t.contains("1024-token context"), "{t}");
        assert!(t.contains(&format!("]({SCALING_PNG})")), "{t}");
    }

    #[test]
    fn batch_table_reads_the_old_single_object_and_nothing() {
        let old = json!({"batched": {"batch": 64, "context": 1024, "step_ms": 2.84, "tokens_per_s": 22561.0,
                                     "roofline_tokens_per_s": 58729.0}});
        let t = batch_table(&old, None);
        assert!(t.contains("| 64 | 22561 | 2.84 | 58729 | 38 % | — | — | — |"), "{t}");
        assert_eq!(batch_table(&json!({"batched": null}), None), "");
        assert_eq!(batch_table(&json!({"batched": []}), None), "");
    }

    #[test]
    fn gpu_table_stays_between_its_markers() {
        let gpu = json!({"results": {"floor_ms_per_token": 0.5, "runs": [], "device": "GPU",
                                     "batched": [{"batch": 8, "context": 256, "step_ms": 1.0, "tokens_per_s": 8000.0,
                                                  "roofline_tokens_per_s": 16000.0}]}});
        let doc = "intro\n<!-- bench:gpu -->\nold\n<!-- /bench:gpu -->\noutro\n";
        let new = replace_between(doc, "gpu", &gpu_table(&gpu, None, None)).expect("markers");
        assert!(new.starts_with("intro\n<!-- bench:gpu -->\n| |"), "{new}");
        assert!(new.ends_with("_\n<!-- /bench:gpu -->\noutro\n"), "{new}");
        assert!(new.contains("| 8 | 8000 | 1.00 | 16000 | 50 % |"), "{new}");
        assert!(!new.contains("old"), "{new}");
    }
}
