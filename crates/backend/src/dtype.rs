//! Element types the backends understand.

use std::fmt;

/// Element type of a tensor view. The numeric codes are part of the host ABI (`dtype` arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// bfloat16: the top half of a binary32.
    BF16 = 1,
    /// IEEE 754 binary16.
    F16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Required alignment of a tensor's first byte (the element size).
    pub const fn align(self) -> usize {
        self.size()
    }

    /// The dtype whose ABI code is `code`, if any.
    pub fn from_code(code: u32) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::BF16),
            2 => Some(DType::F16),
            _ => None,
        }
    }

    /// The dtype's ABI code (the inverse of [`from_code`](Self::from_code)).
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The lower-case name used in messages and files (`f32`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
