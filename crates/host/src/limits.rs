//! Per-actor sandbox limits: a memory cap enforced by a wasmtime `ResourceLimiter`, and a deadline enforced by
//! epoch interruption.

use std::time::Duration;

/// Limits applied to each actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActorLimits {
    /// Largest linear memory the actor may have, in bytes. Growth past it traps with a message.
    pub memory_bytes: usize,
    /// Longest a single call into the actor may run before it is interrupted.
    pub deadline: Duration,
    /// Largest table (function references) the actor may have, in elements.
    pub table_elements: usize,
}

impl Default for ActorLimits {
    fn default() -> Self {
        ActorLimits { memory_bytes: 1 << 30, deadline: Duration::from_secs(60), table_elements: 100_000 }
    }
}

/// The error a limiter returns when growth passes the cap; recognised by the host to report
/// `ActorError::MemoryCap`.
#[derive(Debug, thiserror::Error)]
#[error("memory cap exceeded: the actor asked for {desired} bytes of linear memory, its cap is {cap} bytes")]
pub(crate) struct MemoryCapExceeded {
    pub desired: usize,
    pub cap: usize,
}

pub(crate) struct Limiter {
    pub limits: ActorLimits,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.memory_bytes {
            return Err(MemoryCapExceeded { desired, cap: self.limits.memory_bytes }.into());
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= self.limits.table_elements)
    }
}
