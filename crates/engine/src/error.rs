//! [`EngineError`]: what can go wrong loading or running a model, naming the file and what is wrong.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file is present but its contents are wrong.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A required file is missing from the model directory.
    #[error("model directory {dir} has no {file}: {hint}")]
    Missing {
        /// The model directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
        /// What it is for.
        hint: &'static str,
    },
    /// The tokenizer failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A request does not fit the model (sequence too long, token out of range, ...).
    #[error("{0}")]
    Request(String),
    /// The caller stopped the pass through its [`Cancel`](crate::Cancel) hook (a deadline, a shutdown).
    #[error("the forward pass was cancelled by its caller")]
    Cancelled,
    /// The backend refused an operation.
    #[error(transparent)]
    Backend(#[from] driftwood_backend::BackendError),
}

impl EngineError {
    /// Whether the backend ran out of device memory ([`BackendError::is_out_of_memory`]): a failure of the
    /// moment (the device is full), not of the request, which may succeed once memory is given back.
    ///
    /// [`BackendError::is_out_of_memory`]: driftwood_backend::BackendError::is_out_of_memory
    pub fn is_device_out_of_memory(&self) -> bool {
        matches!(self, EngineError::Backend(e) if e.is_out_of_memory())
    }
}

pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> EngineError {
    EngineError::Invalid { path: path.into(), message: message.into() }
}
