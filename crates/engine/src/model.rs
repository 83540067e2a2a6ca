//! [`Model`]: a loaded Hugging Face model directory: config, mapped weights, tokenizer, chat template.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::config::{Architecture, ModelConfig};
use crate::error::{EngineError, invalid};
use crate::template::{ChatMessage, ChatTemplate};
use crate::weights::{Weight, WeightFiles};

/// One transformer block's weights. Matrices stay in their stored dtype; vectors are widened to f32.
pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,  // (hidden)
    pub wq: Weight,           // (q_dim, hidden)
    pub wk: Weight,           // (kv_dim, hidden)
    pub wv: Weight,           // (kv_dim, hidden)
    pub bq: Option<Vec<f32>>, // (q_dim)   Qwen2
    pub bk: Option<Vec<f32>>, // (kv_dim)  Qwen2
    pub bv: Option<Vec<f32>>, // (kv_dim)  Qwen2
    pub wo: Weight,           // (hidden, q_dim)
    pub ffn_norm: Vec<f32>,   // (hidden)
    pub w_gate: Weight,       // (intermediate, hidden)
    pub w_up: Weight,         // (intermediate, hidden)
    pub w_down: Weight,       // (hidden, intermediate)
}

/// Progress of [`Model::load`], for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct LoadProgress {
    /// Weight bytes read so far.
    pub bytes_done: usize,
    /// Weight bytes in all files.
    pub bytes_total: usize,
}

/// A model ready to run: weights mapped read-only once and shared by every sequence and actor using it.
pub struct Model {
    dir: PathBuf,
    config: ModelConfig,
    pub(crate) embed: Weight, // (vocab, hidden)
    pub(crate) layers: Vec<Layer>,
    pub(crate) final_norm: Vec<f32>, // (hidden)
    pub(crate) lm_head: Weight,      // (vocab, hidden); the embedding when tied
    pub(crate) inv_freq: Vec<f32>,   // (head_dim / 2)
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    add_bos: bool,
    fingerprint: String,
    tokenizer_fingerprint: String,
    weight_bytes_per_token: usize,
    /// The weights on the CUDA device, uploaded on first GPU use.
    pub(crate) gpu: std::sync::OnceLock<crate::exec::cuda::GpuModel>,
    /// Held while `gpu` is uploaded, so that actors starting together upload the weights once, not once each.
    pub(crate) gpu_upload: std::sync::Mutex<()>,
    // Last: the mappings the `Weight`s point into are dropped after everything that refers to them.
    _files: WeightFiles,
}

fn read(path: &Path) -> Result<Vec<u8>, EngineError> {
    std::fs::read(path).map_err(|source| EngineError::Io { path: path.into(), source })
}

fn require(dir: &Path, file: &'static str, hint: &'static str) -> Result<PathBuf, EngineError> {
    let path = dir.join(file);
    if path.exists() { Ok(path) } else { Err(EngineError::Missing { dir: dir.into(), file, hint }) }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token given in `tokenizer_config.json` either as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Model {
    /// Loads a Hugging Face model directory: `config.json`, `model.safetensors` (or the sharded index),
    /// `tokenizer.json`, and `tokenizer_config.json` for the chat template (optional). `progress` is called
    /// as the weights are read in.
    ///
    /// # Errors
    ///
    /// [`EngineError::Missing`] for a missing file, [`EngineError::Invalid`] naming the file and problem for
    /// malformed config, weights or tokenizer, including any tensor whose shape or dtype does not fit.
    pub fn load(dir: &Path, progress: &mut dyn FnMut(LoadProgress)) -> Result<Model, EngineError> {
        let config_path = require(dir, "config.json", "the model's configuration")?;
        let mut config = ModelConfig::from_file(&config_path)?;
        // generation_config.json may list more stop tokens (chat turn ends) than config.json.
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen_config: Value = serde_json::from_slice(&read(&gen_path)?)
                .map_err(|e| invalid(&gen_path, format!("not valid JSON: {e}")))?;
            let extra = match gen_config.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
                _ => vec![],
            };
            for id in extra {
                if id < config.vocab_size as u64 && !config.eos_token_ids.contains(&(id as u32)) {
                    config.eos_token_ids.push(id as u32);
                }
            }
        }
        let tokenizer_path = require(dir, "tokenizer.json", "the tokenizer (Hugging Face `tokenizers` format)")?;
        let tokenizer_bytes = read(&tokenizer_path)?;
        let tokenizer = Tokenizer::from_bytes(&tokenizer_bytes)
            .map_err(|e| invalid(&tokenizer_path, format!("not a valid tokenizer: {e}")))?;
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(invalid(
                &tokenizer_path,
                format!(
                    "the tokenizer has {} tokens but config.json's vocab_size is {}",
                    tokenizer.get_vocab_size(true),
                    config.vocab_size
                ),
            ));
        }
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config: Value = if tok_config_path.exists() {
            serde_json::from_slice(&read(&tok_config_path)?)
                .map_err(|e| invalid(&tok_config_path, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let bos = token_text(tok_config.get("bos_token")).unwrap_or_default();
        let eos = token_text(tok_config.get("eos_token")).unwrap_or_default();
        let template_source = match tok_config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let template = template_source
            .map(|s| ChatTemplate::new(s, bos, eos))
            .transpose()
            .map_err(|e| invalid(&tok_config_path, format!("chat_template does not compile: {e}")))?;
        let add_bos = tok_config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);

        let mut files = WeightFiles::open(dir)?;
        let c = &config;
        let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let embed = files.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>, EngineError> {
                let full = format!("{p}.self_attn.{name}.bias");
                if files.has(&full) { Ok(Some(files.get(&full, &[len])?.to_f32())) } else { Ok(None) }
            };
            let (bq, bk, bv) = (bias("q_proj", q)?, bias("k_proj", kv)?, bias("v_proj", kv)?);
            if c.architecture == Architecture::Qwen2 && (bq.is_none() || bk.is_none() || bv.is_none()) {
                return Err(invalid(dir.join("model.safetensors"), format!("Qwen2 layer {i} lacks q/k/v biases")));
            }
            layers.push(Layer {
                attn_norm: files.get(&format!("{p}.input_layernorm.weight"), &[h])?.to_f32(),
                wq: files.get(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?,
                wk: files.get(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?,
                wv: files.get(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?,
                bq,
                bk,
                bv,
                wo: files.get(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?,
                ffn_norm: files.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?.to_f32(),
                w_gate: files.get(&format!("{p}.mlp.gate_proj.weight"), &[ff, h])?,
                w_up: files.get(&format!("{p}.mlp.up_proj.weight"), &[ff, h])?,
                w_down: files.get(&format!("{p}.mlp.down_proj.weight"), &[h, ff])?,
            });
        }
        let final_norm = files.get("model.norm.weight", &[h])?.to_f32();
        let lm_head = if c.tie_word_embeddings { embed } else { files.get("lm_head.weight", &[c.vocab_size, h])? };
        let weight_bytes_per_token = layers
            .iter()
            .flat_map(|l| [l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down])
            .map(|w| w.bytes())
            .sum::<usize>()
            + lm_head.bytes();
        files.prefault(&mut |done, total| progress(LoadProgress { bytes_done: done, bytes_total: total }));

        let mut hasher = Sha256::new();
        hasher.update(read(&config_path)?);
        for header in &files.headers {
            hasher.update(header);
        }
        let fingerprint = hex(&hasher.finalize());
        let tokenizer_fingerprint = hex(&Sha256::digest(&tokenizer_bytes));
        let inv_freq = crate::rope::inv_freq(&config);
        Ok(Model {
            dir: dir.into(),
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            gpu: std::sync::OnceLock::new(),
            gpu_upload: std::sync::Mutex::new(()),
            inv_freq,
            tokenizer,
            template,
            add_bos,
            fingerprint,
            tokenizer_fingerprint,
            weight_bytes_per_token,
            _files: files,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SHA-256 over `config.json` and every safetensors header (names, dtypes, shapes, offsets).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// SHA-256 of `tokenizer.json`.
    pub fn tokenizer_fingerprint(&self) -> &str {
        &self.tokenizer_fingerprint
    }

    /// Weight bytes one decode step reads (every projection plus the output head).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes_per_token
    }

    /// f32 elements of a KV cache for `max_seq` tokens: `layers · 2 · max_seq · kv_dim`.
    pub fn kv_floats(&self, max_seq: usize) -> usize {
        self.kv_elems(max_seq)
    }

    /// Elements of a KV cache for `max_seq` tokens, of any dtype: `layers · 2 · max_seq · kv_dim`.
    pub fn kv_elems(&self, max_seq: usize) -> usize {
        self.config.num_layers * 2 * max_seq * self.config.kv_dim()
    }

    /// Bytes of a KV cache for `max_seq` tokens whose elements are `dtype`.
    pub fn kv_bytes(&self, max_seq: usize, dtype: driftwood_backend::DType) -> usize {
        self.kv_elems(max_seq) * dtype.size()
    }

    /// Token ids of `text`. With `add_special`, the tokenizer's own special tokens are added, and the
    /// beginning-of-sequence token is prepended when `tokenizer_config.json` asks for it and the tokenizer
    /// did not add it.
    ///
    /// # Errors
    ///
    /// [`EngineError::Tokenizer`] if the tokenizer fails.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EngineError> {
        let encoding = self.tokenizer.encode(text, add_special).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special
            && self.add_bos
            && let Some(bos) = self.config.bos_token_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens skipped when `skip_special`).
    ///
    /// # Errors
    ///
    /// [`EngineError::Tokenizer`] if an id is outside the vocabulary.
    pub fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Renders a conversation with the model's chat template.
    ///
    /// # Errors
    ///
    /// [`EngineError::Template`] if the model has no template or rendering fails.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, EngineError> {
        let template = self.template.as_ref().ok_or_else(|| {
            EngineError::Template(format!("{} has no chat_template in tokenizer_config.json", self.dir.display()))
        })?;
        template.render(messages, add_generation_prompt)
    }

    /// Token ids that end a generation: the config's `eos_token_id`(s).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.config.eos_token_ids
    }
}
