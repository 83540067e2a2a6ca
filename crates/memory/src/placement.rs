//! How an accelerator sees a region's bytes.

use std::fmt;

/// Where a [`SharedRegion`](crate::SharedRegion)'s committed bytes live as far as a compute backend is
/// concerned.
///
/// The set is closed on purpose (one `match` per backend tells what each placement needs). Each placement
/// decides what happens when a range is committed: `Host` needs nothing; the CUDA placements register or
/// allocate the range so the device can address it, and must make the device address of every committed byte
/// known before the backend touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Placement {
    /// Ordinary host memory, read and written in place by the CPU backend. Also the right choice on
    /// unified-memory machines.
    #[default]
    Host,
}

impl Placement {
    /// The name used on the command line and in reports (`host`).
    pub fn name(self) -> &'static str {
        match self {
            Placement::Host => "host",
        }
    }

    /// Parses a placement name as printed by [`Placement::name`].
    ///
    /// # Errors
    ///
    /// Returns a message listing the known placements when `name` is not one of them.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "host" => Ok(Placement::Host),
            "pinned" | "managed" => Err(format!(
                "placement `{name}` needs the CUDA backend, which this build does not provide yet; known: host"
            )),
            other => Err(format!("unknown placement `{other}`; known: host")),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
