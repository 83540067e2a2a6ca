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
    /// Host memory page-locked and mapped into the GPU's address space (`cuMemHostRegister` with
    /// `DEVICEMAP` on each committed range). The GPU reads and writes it across the bus; on a device with
    /// unified addressing the device address equals the host address (checked when the range is registered).
    CudaPinned,
    /// CUDA managed memory (`cuMemAllocManaged`): one allocation the CPU and the GPU both address, whose pages
    /// migrate to whichever touches them, so the GPU reads it at device-memory speed in steady state. Capped
    /// by the device's free memory.
    CudaManaged,
}

impl Placement {
    /// The name used on the command line and in reports (`host`, `pinned`, `managed`).
    pub fn name(self) -> &'static str {
        match self {
            Placement::Host => "host",
            Placement::CudaPinned => "pinned",
            Placement::CudaManaged => "managed",
        }
    }

    /// Whether a GPU backend must make the region addressable (every placement but `Host`).
    pub fn needs_device(self) -> bool {
        !matches!(self, Placement::Host)
    }

    /// Parses a placement name as printed by [`Placement::name`].
    ///
    /// # Errors
    ///
    /// Returns a message listing the known placements when `name` is not one of them.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "host" => Ok(Placement::Host),
            "pinned" => Ok(Placement::CudaPinned),
            "managed" => Ok(Placement::CudaManaged),
            other => Err(format!("unknown placement `{other}`; known: host, pinned, managed")),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
