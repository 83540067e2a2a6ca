//! Which rows of its KV cache the host has written for an actor in CUDA managed memory, so that a whole-actor
//! snapshot copies those rows from the device ([`CudaBackend::read_blocks`]) instead of reading the cache from
//! the CPU.
//!
//! A read from the CPU moves every managed page it touches to host memory, and the device then reads those rows
//! across the bus until they are moved back. A server snapshots its actors after every turn; with a cache of tens
//! of MiB per actor, reading whole caches from the CPU moved gigabytes a second each way and held up the
//! batched decode passes of every other actor (their passes took four times as long as without snapshots).
//!
//! The host writes a cache only through `forward` (rows `pos..pos + n`) and `session_load` (rows `0..n`), so
//! the rows below the highest row written are all the rows the host has put there. A snapshot takes those rows
//! from the device and stores the rest of the cache as zero (see [`KvRows`] for what that means for a guest).
//!
//! [`CudaBackend::read_blocks`]: driftwood_backend::cuda::CudaBackend::read_blocks

use std::ops::Range;

use driftwood_backend::DType;
use driftwood_engine::Model;

/// The one KV cache the host has written for an actor, and how many of its rows.
///
/// What a snapshot stores of the cache's range: rows `0..rows` of each (layer, {k, v}) block as the device holds
/// them, and zero for every other byte of the range. Rows at or past `rows` are rows that no `forward` or
/// `session_load` has written since the actor was created or restored: a cache row is attended to only after a
/// forward has written it, so for a guest that uses its cache through the host alone they are never read. A
/// guest that writes such rows itself, or reads a row before its forward writes it, finds zeros there after a
/// restore (this is in the ABI's description of `forward`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KvRows {
    /// The cache's bytes in the actor's memory (offsets from the guest's 0).
    pub range: Range<usize>,
    /// Bytes of one (layer, {k, v}) block: `max_seq` rows.
    pub block: usize,
    /// Bytes of one row (one token's keys, or values, of one layer).
    pub row: usize,
    /// Blocks in the cache: two per layer.
    pub blocks: usize,
    /// Rows written in every block: one past the highest row a forward or session load wrote.
    pub rows: usize,
}

impl KvRows {
    /// Rows below `rows_end` of the cache at `range`: `max_seq` rows of `dtype` for `model`.
    pub fn of(range: Range<usize>, model: &Model, dtype: DType, max_seq: usize, rows_end: usize) -> Self {
        let c = model.config();
        let row = c.kv_dim() * dtype.size();
        KvRows { range, block: max_seq * row, row, blocks: 2 * c.num_layers, rows: rows_end.min(max_seq) }
    }

    /// Whether `other` is the same cache (place and shape).
    fn same_cache(&self, other: &KvRows) -> bool {
        (&self.range, self.block, self.row, self.blocks) == (&other.range, other.block, other.row, other.blocks)
    }

    /// Bytes of each block's written rows.
    pub fn used(&self) -> usize {
        self.rows * self.row
    }

    /// The written rows of every block within `copy` (`blocks` runs of [`used`](Self::used) bytes, one after
    /// another), each with its offset in the actor's memory: the pieces of a snapshot's overlay.
    pub fn pieces<'a>(&self, copy: &'a [u8]) -> Vec<(usize, &'a [u8])> {
        let used = self.used();
        (0..self.blocks)
            .filter_map(|b| Some((self.range.start + b * self.block, copy.get(b * used..(b + 1) * used)?)))
            .collect()
    }
}

/// What the host has written into an actor's KV caches (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum KvTrace {
    /// No cache yet.
    #[default]
    None,
    /// One cache.
    One(KvRows),
    /// Caches at more than one place (or of more than one shape): a snapshot then reads the memory from the
    /// CPU, as for any actor, and the range is the cache the last forward named.
    Several(Range<usize>),
}

impl KvTrace {
    /// Records that the host wrote the rows `written` names.
    pub fn wrote(&mut self, written: KvRows) {
        *self = match std::mem::take(self) {
            KvTrace::None => KvTrace::One(written),
            KvTrace::One(mut seen) if seen.same_cache(&written) => {
                seen.rows = seen.rows.max(written.rows);
                KvTrace::One(seen)
            }
            KvTrace::One(_) | KvTrace::Several(_) => KvTrace::Several(written.range),
        };
    }

    /// The rows written, when there is one cache.
    pub fn one(&self) -> Option<&KvRows> {
        match self {
            KvTrace::One(rows) => Some(rows),
            _ => None,
        }
    }

    /// The cache the last forward named, if any.
    pub fn last_range(&self) -> Option<&Range<usize>> {
        match self {
            KvTrace::None => None,
            KvTrace::One(rows) => Some(&rows.range),
            KvTrace::Several(range) => Some(range),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(start: usize, rows: usize) -> KvRows {
        // 2 layers, 8 rows of 16 bytes.
        KvRows { range: start..start + 4 * 128, block: 128, row: 16, blocks: 4, rows }
    }

    #[test]
    fn one_cache_keeps_its_highest_row() {
        let mut trace = KvTrace::default();
        assert_eq!(trace.last_range(), None);
        trace.wrote(rows(64, 5)); // a prompt
        trace.wrote(rows(64, 6)); // a step
        trace.wrote(rows(64, 2)); // a rewind to a shared prefix: rows 2..6 are still there
        assert_eq!(trace.one(), Some(&rows(64, 6)));
        assert_eq!(trace.last_range(), Some(&(64..576)));
    }

    #[test]
    fn a_second_cache_gives_up_tracking_for_good() {
        let mut trace = KvTrace::default();
        trace.wrote(rows(64, 5));
        trace.wrote(rows(1024, 1));
        assert_eq!(trace, KvTrace::Several(1024..1536));
        // Back to the first cache: its rows are no longer known, so they are not tracked again.
        trace.wrote(rows(64, 7));
        assert_eq!(trace.one(), None);
        assert_eq!(trace.last_range(), Some(&(64..576)));
        // The same place with another shape is another cache.
        let mut trace = KvTrace::default();
        trace.wrote(rows(64, 5));
        trace.wrote(KvRows { row: 8, block: 64, ..rows(64, 5) });
        assert_eq!(trace.one(), None);
    }

    #[test]
    fn pieces_are_the_written_rows_of_every_block() {
        let written = rows(64, 3);
        let copy: Vec<u8> = (0..4 * 48).map(|i| i as u8).collect();
        let pieces = written.pieces(&copy);
        assert_eq!(
            pieces.iter().map(|(at, b)| (*at, b.len())).collect::<Vec<_>>(),
            [(64, 48), (192, 48), (320, 48), (448, 48)]
        );
        assert_eq!(pieces[2].1, &copy[96..144]);
        assert!(written.pieces(&copy[..100]).len() < 4, "a short copy gives no piece past its end");
    }
}
