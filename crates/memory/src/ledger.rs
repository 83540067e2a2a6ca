//! [`CopyLedger`]: every byte the runtime copies between guest memory and anything else.
//!
//! What counts as a copy: moving bytes out of an actor's linear memory into another buffer (host heap,
//! device buffer, file) or into it from one. What does not: a backend reading or writing the guest's bytes in
//! place, and a kernel staging cache-sized tiles of an operand inside one call (every GEMM packs its panels;
//! the packed tile is transient and never holds a whole tensor).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a copy carried; reports break the totals down by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// Tensor data: matrices, KV cache, logits, activations.
    Tensor,
    /// Text and control data: log lines, token strings, names.
    Text,
    /// A snapshot of memory written to or read from storage.
    Snapshot,
}

/// Thread-safe counters of copied bytes. Cheap to update; read with [`snapshot`](Self::snapshot).
#[derive(Debug, Default)]
pub struct CopyLedger {
    tensor: AtomicU64,
    text: AtomicU64,
    snapshot: AtomicU64,
    copies: AtomicU64,
}

/// The ledger's totals at one moment. Subtract two snapshots to get what a span of work copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerSnapshot {
    /// Bytes of tensor data copied.
    pub tensor_bytes: u64,
    /// Bytes of text/control data copied.
    pub text_bytes: u64,
    /// Bytes copied to or from snapshots.
    pub snapshot_bytes: u64,
    /// Number of copy operations recorded.
    pub copies: u64,
}

impl LedgerSnapshot {
    /// All bytes copied, of every kind.
    pub fn total_bytes(&self) -> u64 {
        self.tensor_bytes + self.text_bytes + self.snapshot_bytes
    }

    /// What was copied between `earlier` and `self`.
    pub fn since(&self, earlier: &LedgerSnapshot) -> LedgerSnapshot {
        LedgerSnapshot {
            tensor_bytes: self.tensor_bytes.saturating_sub(earlier.tensor_bytes),
            text_bytes: self.text_bytes.saturating_sub(earlier.text_bytes),
            snapshot_bytes: self.snapshot_bytes.saturating_sub(earlier.snapshot_bytes),
            copies: self.copies.saturating_sub(earlier.copies),
        }
    }
}

impl CopyLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `bytes` of `kind` were copied into or out of guest memory.
    pub fn record(&self, kind: CopyKind, bytes: usize) {
        let counter = match kind {
            CopyKind::Tensor => &self.tensor,
            CopyKind::Text => &self.text,
            CopyKind::Snapshot => &self.snapshot,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        self.copies.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn snapshot(&self) -> LedgerSnapshot {
        LedgerSnapshot {
            tensor_bytes: self.tensor.load(Ordering::Relaxed),
            text_bytes: self.text.load(Ordering::Relaxed),
            snapshot_bytes: self.snapshot.load(Ordering::Relaxed),
            copies: self.copies.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_kind_and_diffs() {
        let l = CopyLedger::new();
        let before = l.snapshot();
        l.record(CopyKind::Tensor, 100);
        l.record(CopyKind::Text, 5);
        let d = l.snapshot().since(&before);
        assert_eq!((d.tensor_bytes, d.text_bytes, d.copies, d.total_bytes()), (100, 5, 2, 105));
    }
}
