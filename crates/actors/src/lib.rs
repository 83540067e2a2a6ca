//! WebAssembly modules of the actors that ship with Driftwood, compiled from `guest/` at build time.

#![warn(missing_docs)]

pub mod toolchain;

/// The seed experiment actor (`guest/actors/matmul-check`): fills matrices in its own memory, has the host
/// multiply them in place and checks every element; also exports the loops `driftwood bench` times.
pub const MATMUL_CHECK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/matmul_check.wasm"));

/// The default actor (`guest/actors/chat`): plain generation and multi-turn chat with the host's `default`
/// model; sampling, conversation and KV cache all live in its memory.
pub const CHAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chat.wasm"));
