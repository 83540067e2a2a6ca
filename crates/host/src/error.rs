//! [`ActorError`]: everything that can go wrong running an actor, each with a message a user can act on.

use std::time::Duration;

/// Why an actor could not be created or why a call into it failed. The runtime and other actors are
/// unaffected by any of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActorError {
    /// The bytes are not a valid WebAssembly module.
    #[error("cannot compile actor module: {0}")]
    Compile(String),
    /// The module is valid but does not fit the host (missing exports, unknown imports, ...).
    #[error("cannot instantiate actor: {0}")]
    Instantiate(String),
    /// The module was built for another host ABI version.
    #[error(
        "actor was built for driftwood ABI v{guest}, but this host speaks v{host}; rebuild it with a matching guest SDK"
    )]
    AbiMismatch {
        /// The version the module declares.
        guest: u32,
        /// The version this host implements.
        host: u32,
    },
    /// The call ran past its deadline and was interrupted, in guest code or between pieces of a host call's
    /// work.
    #[error("actor call `{export}` ran longer than its {deadline:?} deadline and was interrupted")]
    Deadline {
        /// The export that was running.
        export: String,
        /// The deadline that was exceeded.
        deadline: Duration,
    },
    /// The guest tried to grow its memory past its cap.
    #[error("actor call `{export}` trapped: {message}")]
    MemoryCap {
        /// The export that was running.
        export: String,
        /// What was asked for and what the cap is.
        message: String,
    },
    /// The actor would have made the host keep more than its host allowance
    /// ([`ActorLimits::host_bytes`](crate::ActorLimits::host_bytes)): emitted text nobody took, or model handles.
    #[error("actor call `{export}` trapped: {message}")]
    HostAllowance {
        /// The export that was running.
        export: String,
        /// The host call, what it asked for and the allowance.
        message: String,
    },
    /// The runtime was shut down ([`Runtime::shutdown`](crate::Runtime::shutdown)) while the call ran.
    #[error("actor call `{export}` was stopped: the runtime is shutting down")]
    Shutdown {
        /// The export that was running.
        export: String,
    },
    /// The device ran out of memory: a host call's device work could not allocate (the GPU is full of other
    /// actors' memory, or a batch or prompt needs more scratch than is left), or, at instantiation, the
    /// actor's memory could not be placed on the device. Nothing is wrong with the actor's request; it may
    /// succeed once memory is given back (fewer actors, a smaller memory limit). The call was stopped, so the
    /// actor's state is that of a trap.
    #[error("actor call `{export}` stopped: the device is out of memory: {message}")]
    DeviceMemory {
        /// The export that was running (`(instantiation)` when the actor's memory could not be created).
        export: String,
        /// What could not be allocated, and how much was free.
        message: String,
    },
    /// The guest trapped (including a host call that rejected its arguments).
    #[error("actor call `{export}` trapped: {message}")]
    Trap {
        /// The export that was running.
        export: String,
        /// The trap's message; for a rejected host call it names the call and the range.
        message: String,
    },
    /// The export does not exist or has another signature.
    #[error("actor has no export `{export}` of the requested type: {message}")]
    NoSuchExport {
        /// The export asked for.
        export: String,
        /// wasmtime's explanation.
        message: String,
    },
    /// The host itself failed (out of memory for a copy, ...).
    #[error("{0}")]
    Host(String),
}
