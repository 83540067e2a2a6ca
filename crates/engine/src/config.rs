//! `config.json` of a Hugging Face model directory, read into the few numbers the forward pass needs.
//!
//! Both spellings in the wild are accepted: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and
//! transformers 5 (`rope_parameters`, `dtype`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, invalid};

/// Model families the engine runs. All share the Llama block (RMSNorm, rotate-half RoPE, GQA attention,
/// SwiGLU); they differ in details recorded in [`ModelConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2/3/3.x, SmolLM/SmolLM2).
    Llama,
    /// `MistralForCausalLM` (sliding-window attention when configured).
    Mistral,
    /// `Qwen2ForCausalLM` (biases on the q/k/v projections).
    Qwen2,
}

/// RoPE frequency scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1-style scaling of low frequencies.
    Llama3 {
        /// Divisor for the lowest frequencies.
        factor: f64,
        /// Wavelength boundary (as a fraction of the original context) below which frequencies are scaled.
        low_freq_factor: f64,
        /// Wavelength boundary above which frequencies are kept.
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// The configuration the engine runs a model with.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU hidden layer.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether the output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding attention window, if the model uses one.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    sliding_window: Option<Value>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn f64_field(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    ///
    /// [`EngineError::Io`] if unreadable, [`EngineError::Invalid`] naming the field if malformed, missing or
    /// inconsistent, or for an architecture the engine does not run.
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io { path: path.into(), source })?;
        Self::from_json(&text).map_err(|message| invalid(path, message))
    }

    /// Parses and validates the text of a `config.json`.
    ///
    /// # Errors
    ///
    /// A message naming the field that is missing, malformed or inconsistent.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| format!("not a valid model config: {e}"))?;
        let name = raw.architectures.first().cloned().or(raw.model_type.clone()).unwrap_or_default();
        let architecture = match name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => {
                return Err(format!(
                    "architecture `{other}` is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                ));
            }
        };
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|p| f64_field(p, "rope_theta")))
            .unwrap_or(10_000.0);
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "llama3" => {
                let r = rope.ok_or("rope scaling `llama3` without parameters")?;
                let field = |k: &str| f64_field(r, k).ok_or(format!("rope scaling `llama3` lacks `{k}`"));
                RopeScaling::Llama3 {
                    factor: field("factor")?,
                    low_freq_factor: field("low_freq_factor")?,
                    high_freq_factor: field("high_freq_factor")?,
                    original_max_position_embeddings: field("original_max_position_embeddings")?,
                }
            }
            other => return Err(format!("rope scaling `{other}` is not supported (supported: default, llama3)")),
        };
        let window = raw.sliding_window.as_ref().and_then(Value::as_u64).map(|w| w as usize);
        // Qwen2 declares a window but uses it only with `use_sliding_window: true` (transformers agrees).
        let sliding_window = match architecture {
            Architecture::Qwen2 if raw.use_sliding_window != Some(true) => None,
            Architecture::Llama => None,
            _ => window,
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let config = ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 || value > 1 << 24 {
                return Err(format!("`{name}` = {value} is out of range"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "`num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("`head_dim` ({}) must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err("`rms_norm_eps` must be a finite non-negative number".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err("`rope_theta` must be a finite number above 1".into());
        }
        if self.vocab_size > u32::MAX as usize / 2 {
            return Err("`vocab_size` is too large".into());
        }
        Ok(())
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together: one token's K (or V) in the cache.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
        "rms_norm_eps":1e-5,"rope_theta":100000,"tie_word_embeddings":true,"eos_token_id":[1,2]}"#;

    #[test]
    fn reads_both_rope_spellings() {
        let c = ModelConfig::from_json(SMOL).unwrap();
        assert_eq!((c.head_dim, c.kv_dim(), c.rope_theta, c.eos_token_ids.clone()), (16, 32, 100000.0, vec![1, 2]));
        let v5 = SMOL.replace(
            r#""rope_theta":100000"#,
            r#""rope_parameters":{"rope_type":"llama3","rope_theta":500000,"factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":64}"#,
        );
        let c = ModelConfig::from_json(&v5).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let e = ModelConfig::from_json(&SMOL.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap_err();
        assert!(e.contains("GPT2LMHeadModel") && e.contains("not supported"), "{e}");
        let e = ModelConfig::from_json(&SMOL.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#))
            .unwrap_err();
        assert!(e.contains("multiple"), "{e}");
        let e = ModelConfig::from_json(&SMOL.replace(r#""hidden_size":64,"#, "")).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
        assert!(ModelConfig::from_json("{ nope").is_err());
    }
}
