//! Counters of the server, rendered as Prometheus text by [`Metrics::render`].

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use driftwood_host::{BATCH_SIZE_BOUNDS, Runtime};

/// Upper bounds (seconds) of the restore-latency histogram's buckets.
const RESTORE_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A cumulative histogram.
#[derive(Debug, Default)]
struct Histogram {
    /// Count per bucket of [`RESTORE_BUCKETS`] (not cumulative; summed when rendered).
    buckets: [u64; RESTORE_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Everything `/metrics` reports, updated by the request path.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered, by (endpoint, status).
    requests: Mutex<std::collections::BTreeMap<(&'static str, u16), u64>>,
    /// Prompt tokens of completed turns.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens actually evaluated (prefill).
    pub prefill_tokens: AtomicU64,
    /// Prompt tokens reused from an actor's KV cache instead of being evaluated.
    pub prefill_saved_tokens: AtomicU64,
    /// Of those, the ones reused by turns that started from a restored snapshot.
    pub restore_prefill_saved_tokens: AtomicU64,
    /// Tokens generated.
    pub completion_tokens: AtomicU64,
    /// Sessions restored from the store.
    pub restores: AtomicU64,
    /// Actors hibernated (dropped from memory, their snapshot kept).
    pub hibernations: AtomicU64,
    /// Snapshots written after turns and at shutdown.
    pub snapshots: AtomicU64,
    /// Actors that trapped (their turn answered 500).
    pub traps: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected_queue_full: AtomicU64,
    /// Requests refused because their session was busy.
    pub rejected_busy: AtomicU64,
    /// Cluster: sessions this node claimed in etcd.
    pub cluster_claims: AtomicU64,
    /// Cluster: snapshots committed (the session's pointer moved).
    pub cluster_commits: AtomicU64,
    /// Cluster: commits refused by the fencing check (the session had moved to another node).
    pub cluster_fenced: AtomicU64,
    /// Cluster: requests refused because another node owns their session.
    pub cluster_owned_elsewhere: AtomicU64,
    /// Cluster: requests forwarded to the node that owns their session (or that it is placed on).
    pub cluster_forwarded: AtomicU64,
    /// Cluster: new sessions placed on another, less loaded node.
    pub cluster_placed: AtomicU64,
    restore_latency: Mutex<Histogram>,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((endpoint, status)).or_default() += 1;
    }

    /// Records how long restoring a session took.
    pub fn restored(&self, took: Duration) {
        self.restores.fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let mut h = self.restore_latency.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = RESTORE_BUCKETS.iter().position(|&b| secs <= b) {
            h.buckets[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The Prometheus text exposition of every metric. `live` and `hibernated` are the actor gauges,
    /// `waiting` the queue's length.
    pub fn render(&self, runtime: &Runtime, live: usize, hibernated: usize, waiting: usize) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter("driftwood_prompt_tokens_total", "Prompt tokens of completed turns.", self.prompt_tokens.load(Relaxed));
        counter(
            "driftwood_prefill_tokens_total",
            "Prompt tokens evaluated (the rest came from the actor's KV cache).",
            self.prefill_tokens.load(Relaxed),
        );
        counter(
            "driftwood_prefill_tokens_saved_total",
            "Prompt tokens reused from an actor's KV cache instead of being evaluated.",
            self.prefill_saved_tokens.load(Relaxed),
        );
        counter(
            "driftwood_restore_prefill_tokens_saved_total",
            "Prompt tokens not evaluated because the session was restored from its snapshot.",
            self.restore_prefill_saved_tokens.load(Relaxed),
        );
        counter("driftwood_completion_tokens_total", "Tokens generated.", self.completion_tokens.load(Relaxed));
        counter("driftwood_sessions_restored_total", "Sessions restored from the store.", self.restores.load(Relaxed));
        counter(
            "driftwood_actors_hibernated_total",
            "Actors released from memory (their snapshot kept in the store).",
            self.hibernations.load(Relaxed),
        );
        counter("driftwood_snapshots_written_total", "Actor snapshots written.", self.snapshots.load(Relaxed));
        counter("driftwood_actor_traps_total", "Turns whose actor trapped.", self.traps.load(Relaxed));
        counter("driftwood_cluster_claims_total", "Sessions this node claimed.", self.cluster_claims.load(Relaxed));
        counter(
            "driftwood_cluster_commits_total",
            "Snapshots committed (the session's pointer moved).",
            self.cluster_commits.load(Relaxed),
        );
        counter(
            "driftwood_cluster_fenced_total",
            "Commits refused by the fencing check: the session had moved to another node.",
            self.cluster_fenced.load(Relaxed),
        );
        counter(
            "driftwood_cluster_owned_elsewhere_total",
            "Requests for a session another node owns (forwarded there, or refused with 409 if already forwarded).",
            self.cluster_owned_elsewhere.load(Relaxed),
        );
        counter(
            "driftwood_cluster_forwarded_total",
            "Requests forwarded to the node that owns their session, or that a new session is placed on.",
            self.cluster_forwarded.load(Relaxed),
        );
        counter(
            "driftwood_cluster_placed_total",
            "New sessions placed on another, less loaded node.",
            self.cluster_placed.load(Relaxed),
        );
        let batch = runtime.batch_stats();
        counter(
            "driftwood_batched_decode_passes_total",
            "Decode passes that carried more than one session.",
            batch.batched_passes,
        );
        counter(
            "driftwood_batched_decode_sequences_total",
            "Sequences carried by batched decode passes.",
            batch.batched_sequences,
        );
        let _ = writeln!(
            out,
            "# HELP driftwood_decode_pass_seconds_total Time spent in decode passes (continuous batching).\n\
             # TYPE driftwood_decode_pass_seconds_total counter\n\
             driftwood_decode_pass_seconds_total {}",
            batch.pass_nanos as f64 * 1e-9
        );
        let _ = writeln!(
            out,
            "# HELP driftwood_requests_rejected_total Requests refused before running.\n\
             # TYPE driftwood_requests_rejected_total counter\n\
             driftwood_requests_rejected_total{{reason=\"queue_full\"}} {}\n\
             driftwood_requests_rejected_total{{reason=\"session_busy\"}} {}",
            self.rejected_queue_full.load(Relaxed),
            self.rejected_busy.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP driftwood_requests_total Requests answered.\n# TYPE driftwood_requests_total counter"
        );
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "driftwood_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge("driftwood_actors_active", "Session actors live in memory.", live as u64);
        gauge("driftwood_actors_hibernated", "Sessions held only as a snapshot in the store.", hibernated as u64);
        gauge("driftwood_queue_waiting", "Requests waiting for a worker.", waiting as u64);
        let ledger = runtime.ledger();
        let _ = writeln!(
            out,
            "# HELP driftwood_copy_ledger_bytes Bytes copied between actor memory and anything else, by kind.\n\
             # TYPE driftwood_copy_ledger_bytes counter\n\
             driftwood_copy_ledger_bytes{{kind=\"tensor\"}} {}\n\
             driftwood_copy_ledger_bytes{{kind=\"text\"}} {}\n\
             driftwood_copy_ledger_bytes{{kind=\"snapshot\"}} {}",
            ledger.tensor_bytes, ledger.text_bytes, ledger.snapshot_bytes
        );
        let h = self.restore_latency.lock().unwrap_or_else(|p| p.into_inner());
        histogram(
            &mut out,
            ("driftwood_restore_seconds", "Time to restore a session's actor from its snapshot."),
            RESTORE_BUCKETS.iter().zip(h.buckets),
            h.sum,
            h.count,
        );
        // Every decode pass of the batcher by the sessions it carried (size 1 included); sum / count is the
        // mean batch size.
        histogram(
            &mut out,
            ("driftwood_decode_batch_size", "Sessions per decode pass (continuous batching)."),
            BATCH_SIZE_BOUNDS.iter().zip(batch.sizes),
            batch.sequences,
            batch.passes,
        );
        out
    }
}

/// Writes a Prometheus histogram: HELP and TYPE lines, cumulative `_bucket` lines from per-bucket counts
/// `(upper bound, count)`, the `+Inf` bucket, `_sum` and `_count`.
fn histogram<B: std::fmt::Display>(
    out: &mut String,
    (name, help): (&str, &str),
    buckets: impl IntoIterator<Item = (B, u64)>,
    sum: impl std::fmt::Display,
    count: u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, n) in buckets {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}
