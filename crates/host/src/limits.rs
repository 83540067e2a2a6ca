//! Per-actor sandbox limits: a memory cap enforced by a wasmtime `ResourceLimiter`, a deadline enforced by
//! epoch interruption (and, inside long host calls, by the host checking it between pieces of work), and a
//! host allowance bounding the memory the host keeps on an actor's behalf.

use std::time::Duration;

/// Smallest [`ActorLimits::host_bytes`] accepted: room for one longest log line and a model handle.
pub const MIN_HOST_BYTES: usize = 128 * 1024;

/// Longest deadline accepted: a year (longer ones are almost certainly a unit mistake, and `Instant`
/// arithmetic must not overflow).
pub const MAX_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Bytes a model handle is charged to the host allowance beyond its name.
pub const MODEL_HANDLE_BYTES: usize = 256;

/// Most distinct model handles one actor may hold (`model_open` of a name it already opened returns the same
/// handle and costs nothing).
pub const MAX_MODEL_HANDLES: usize = 1024;

/// Limits applied to each actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActorLimits {
    /// Largest linear memory the actor may have, in bytes. Growth past it traps with a message.
    pub memory_bytes: usize,
    /// Longest a single call into the actor may run before it is interrupted. Host calls that do long work
    /// (`matmul`, `forward`) check it between bounded pieces of that work, so a call past its deadline returns
    /// soon after it, whether the time goes to guest code or to the host.
    pub deadline: Duration,
    /// Largest table (function references) the actor may have, in elements.
    pub table_elements: usize,
    /// The host allowance: the most bytes the host keeps on the actor's behalf outside its linear memory.
    /// It bounds, together, the text the actor emitted that the host has not yet taken
    /// ([`Actor::take_emitted`](crate::Actor::take_emitted)), the log lines kept for
    /// [`Actor::take_logs`](crate::Actor::take_logs) and its model handles (name plus a fixed
    /// [`MODEL_HANDLE_BYTES`] each). Emitting or opening a model past it traps
    /// the actor ([`ActorError::HostAllowance`](crate::ActorError::HostAllowance)); captured logs make room by
    /// dropping their oldest lines first. Default 16 MiB; at least [`MIN_HOST_BYTES`].
    pub host_bytes: usize,
}

impl Default for ActorLimits {
    fn default() -> Self {
        ActorLimits {
            memory_bytes: 1 << 30,
            deadline: Duration::from_secs(60),
            table_elements: 100_000,
            host_bytes: 16 << 20,
        }
    }
}

impl ActorLimits {
    /// Checks that the limits can be enforced as documented.
    ///
    /// # Errors
    ///
    /// A message naming the field when the memory cap is zero or above the 4 GiB a wasm32 memory can have, the
    /// deadline is zero or above [`MAX_DEADLINE`], or the host allowance is below [`MIN_HOST_BYTES`].
    pub fn validate(&self) -> Result<(), String> {
        if self.memory_bytes == 0 || self.memory_bytes as u64 > 1 << 32 {
            return Err(format!(
                "the actor memory cap must be between 1 byte and 4 GiB (a wasm32 memory), not {} bytes",
                self.memory_bytes
            ));
        }
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(format!(
                "the actor deadline must be more than zero and at most {} s, not {:?}",
                MAX_DEADLINE.as_secs(),
                self.deadline
            ));
        }
        if self.host_bytes < MIN_HOST_BYTES {
            return Err(format!(
                "the actor host allowance must be at least {MIN_HOST_BYTES} bytes, not {}",
                self.host_bytes
            ));
        }
        Ok(())
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

/// A host call that stopped its work because the call's deadline passed; recognised by the host to report
/// `ActorError::Deadline`.
#[derive(Debug, thiserror::Error)]
#[error("{call} stopped: the call ran past its deadline")]
pub(crate) struct HostDeadline {
    pub call: &'static str,
}

/// A host call that stopped its work because the runtime is shutting down; reported as
/// `ActorError::Shutdown`.
#[derive(Debug, thiserror::Error)]
#[error("{call} stopped: the runtime is shutting down")]
pub(crate) struct HostShutdown {
    pub call: &'static str,
}

/// A host call that would have made the host keep more than the actor's host allowance; reported as
/// `ActorError::HostAllowance`.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {detail}")]
pub(crate) struct HostAllowanceExceeded {
    pub call: &'static str,
    pub detail: String,
}

/// A host call whose device work could not get device memory (the GPU is full); reported as
/// `ActorError::DeviceMemory`.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {detail}")]
pub(crate) struct HostDeviceMemory {
    pub call: &'static str,
    pub detail: String,
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
