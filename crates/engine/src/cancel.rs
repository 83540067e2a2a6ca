//! [`Cancel`]: how a caller stops a long forward pass between two of its pieces (layers, prefill chunks).

use crate::EngineError;

/// Asked between the pieces of a forward pass whether to stop; when it answers `true` the pass returns
/// [`EngineError::Cancelled`] at once. The KV rows of the tokens being evaluated are then partly written: the
/// caller must treat that range of the cache as not computed.
#[derive(Clone, Copy)]
pub struct Cancel<'a>(Option<&'a (dyn Fn() -> bool + Sync)>);

impl<'a> Cancel<'a> {
    /// Never stops.
    pub const NEVER: Cancel<'static> = Cancel(None);

    /// Stops when `stop` returns `true`. It is called once per transformer layer of every chunk, so it should
    /// be cheap (a clock read, an atomic load).
    pub fn new(stop: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Cancel(Some(stop))
    }

    /// `Err(Cancelled)` when the caller asks to stop.
    ///
    /// # Errors
    ///
    /// [`EngineError::Cancelled`] when the hook returns `true`.
    pub fn check(&self) -> Result<(), EngineError> {
        match self.0 {
            Some(stop) if stop() => Err(EngineError::Cancelled),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Cancel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Cancel(hook)" } else { "Cancel::NEVER" })
    }
}
