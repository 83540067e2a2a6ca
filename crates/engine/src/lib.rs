//! The model engine of Driftwood: Llama-family transformers (Llama 2/3/3.x, SmolLM/SmolLM2, Qwen2/2.5,
//! Mistral) loaded from Hugging Face model directories and run on the [`Backend`](driftwood_backend::Backend)
//! trait.
//!
//! * [`Model::load`] maps the weights once (read-only, shared by every actor of the model), loads the
//!   tokenizer and the chat template, and validates every tensor against `config.json`.
//! * [`Model::forward`] runs prefill or a decode step for a sequence whose KV cache is a [`KvCache`] view —
//!   in Driftwood, a range of the actor's own linear memory, written in place.
//! * [`Model::decode_batch`] runs one decode step for many sequences (each with its own cache, position and
//!   logits buffer) as one forward pass: continuous batching.
//!
//! # Example
//!
//! ```no_run
//! use driftwood_backend::{Device, TensorMut};
//! use driftwood_engine::{KvCache, Model, Scratch};
//!
//! // Load a model directory once; weights stay mapped read-only.
//! let model = Model::load("models/driftwood-mini".as_ref(), &mut |_| {})?;
//! let device = Device::cpu();
//! // A KV cache for 64 tokens and a logits buffer (in an actor, both live in its linear memory).
//! let mut kv_mem = vec![0f32; model.kv_floats(64)];
//! let mut logits = vec![0f32; model.config().vocab_size];
//! // SAFETY: the buffer holds kv_floats(64) f32s and nothing else uses it while `kv` lives.
//! let mut kv = unsafe { KvCache::from_raw_parts(kv_mem.as_mut_ptr(), &model, 64) };
//! let tokens = model.tokenize("Once upon a time", true)?;
//! model.forward(&device, &mut kv, 0, &tokens, TensorMut::from_f32(&mut logits), &mut Scratch::default())?;
//! # Ok::<(), driftwood_engine::EngineError>(())
//! ```

#![warn(missing_docs)]

mod batch;
mod cancel;
mod config;
mod error;
mod exec;
mod forward;
mod kv;
mod model;
mod rope;
mod template;
mod weights;

pub use batch::{BatchScratch, BatchSeq};
pub use cancel::Cancel;
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::EngineError;
pub use forward::Scratch;
pub use kv::KvCache;
pub use model::{LoadProgress, Model};
pub use template::ChatMessage;
