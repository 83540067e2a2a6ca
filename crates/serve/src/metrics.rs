//! The server's metrics, exposed as Prometheus text by [`Metrics::render`] through the `prometheus` crate.
//!
//! Counters the request path updates live in a [`Registry`]; what the runtime and the session table know
//! (batched decode passes, copy-ledger bytes, actor gauges, queue length) is read when `/metrics` is scraped
//! and added as metric families of the same exposition. Every name and type is as it was when the text was
//! written by hand: counters keep the names given (no `_total` added), `driftwood_copy_ledger_bytes` stays
//! a counter, and `driftwood_decode_batch_size` is a histogram over the runtime's own buckets.

use std::time::Duration;

use driftwood_host::{BATCH_SIZE_BOUNDS, Runtime};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Upper bounds (seconds) of the restore-latency histogram's buckets.
const RESTORE_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Everything `/metrics` reports, updated by the request path.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint and status.
    requests: IntCounterVec,
    /// Prompt tokens of completed turns.
    pub prompt_tokens: IntCounter,
    /// Prompt tokens actually evaluated (prefill).
    pub prefill_tokens: IntCounter,
    /// Prompt tokens reused from an actor's KV cache instead of being evaluated.
    pub prefill_saved_tokens: IntCounter,
    /// Of those, the ones reused by turns that started from a restored snapshot.
    pub restore_prefill_saved_tokens: IntCounter,
    /// Tokens generated.
    pub completion_tokens: IntCounter,
    /// Sessions restored from the store.
    pub restores: IntCounter,
    /// Actors hibernated (dropped from memory, their snapshot kept).
    pub hibernations: IntCounter,
    /// Snapshots written after turns and at shutdown.
    pub snapshots: IntCounter,
    /// Actors that trapped (their turn answered 500).
    pub traps: IntCounter,
    /// Requests refused because the queue was full.
    pub rejected_queue_full: IntCounter,
    /// Requests refused because their session was busy.
    pub rejected_busy: IntCounter,
    /// Cluster: sessions this node claimed in etcd.
    pub cluster_claims: IntCounter,
    /// Cluster: snapshots committed (the session's pointer moved).
    pub cluster_commits: IntCounter,
    /// Cluster: commits refused by the fencing check (the session had moved to another node).
    pub cluster_fenced: IntCounter,
    /// Cluster: requests refused because another node owns their session.
    pub cluster_owned_elsewhere: IntCounter,
    /// Cluster: requests forwarded to the node that owns their session (or that it is placed on).
    pub cluster_forwarded: IntCounter,
    /// Cluster: new sessions placed on another, less loaded node.
    pub cluster_placed: IntCounter,
    restore_latency: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A counter named `name`, registered in `registry`.
fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    // The names are the constants below, valid and distinct (checked by the tests): neither call can fail.
    let c = IntCounter::new(name, help).expect("a valid metric name");
    registry.register(Box::new(c.clone())).expect("a metric name registered once");
    c
}

impl Metrics {
    /// Every metric at zero.
    ///
    /// # Panics
    ///
    /// Never: the metric names are fixed, valid and distinct.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let requests =
            IntCounterVec::new(Opts::new("driftwood_requests_total", "Requests answered."), &["endpoint", "status"])
                .expect("valid label names");
        registry.register(Box::new(requests.clone())).expect("registered once");
        let rejected = IntCounterVec::new(
            Opts::new("driftwood_requests_rejected_total", "Requests refused before running."),
            &["reason"],
        )
        .expect("valid label names");
        registry.register(Box::new(rejected.clone())).expect("registered once");
        let restore_latency = Histogram::with_opts(
            HistogramOpts::new("driftwood_restore_seconds", "Time to restore a session's actor from its snapshot.")
                .buckets(RESTORE_BUCKETS.to_vec()),
        )
        .expect("valid buckets");
        registry.register(Box::new(restore_latency.clone())).expect("registered once");
        Metrics {
            prompt_tokens: counter(r, "driftwood_prompt_tokens_total", "Prompt tokens of completed turns."),
            prefill_tokens: counter(
                r,
                "driftwood_prefill_tokens_total",
                "Prompt tokens evaluated (the rest came from the actor's KV cache).",
            ),
            prefill_saved_tokens: counter(
                r,
                "driftwood_prefill_tokens_saved_total",
                "Prompt tokens reused from an actor's KV cache instead of being evaluated.",
            ),
            restore_prefill_saved_tokens: counter(
                r,
                "driftwood_restore_prefill_tokens_saved_total",
                "Prompt tokens not evaluated because the session was restored from its snapshot.",
            ),
            completion_tokens: counter(r, "driftwood_completion_tokens_total", "Tokens generated."),
            restores: counter(r, "driftwood_sessions_restored_total", "Sessions restored from the store."),
            hibernations: counter(
                r,
                "driftwood_actors_hibernated_total",
                "Actors released from memory (their snapshot kept in the store).",
            ),
            snapshots: counter(r, "driftwood_snapshots_written_total", "Actor snapshots written."),
            traps: counter(r, "driftwood_actor_traps_total", "Turns whose actor trapped."),
            // Both reasons are exposed from the start, at zero.
            rejected_queue_full: rejected.with_label_values(&["queue_full"]),
            rejected_busy: rejected.with_label_values(&["session_busy"]),
            cluster_claims: counter(r, "driftwood_cluster_claims_total", "Sessions this node claimed."),
            cluster_commits: counter(
                r,
                "driftwood_cluster_commits_total",
                "Snapshots committed (the session's pointer moved).",
            ),
            cluster_fenced: counter(
                r,
                "driftwood_cluster_fenced_total",
                "Commits refused by the fencing check: the session had moved to another node.",
            ),
            cluster_owned_elsewhere: counter(
                r,
                "driftwood_cluster_owned_elsewhere_total",
                "Requests for a session another node owns (forwarded there, or refused with 409 if already forwarded).",
            ),
            cluster_forwarded: counter(
                r,
                "driftwood_cluster_forwarded_total",
                "Requests forwarded to the node that owns their session, or that a new session is placed on.",
            ),
            cluster_placed: counter(
                r,
                "driftwood_cluster_placed_total",
                "New sessions placed on another, less loaded node.",
            ),
            requests,
            restore_latency,
            registry,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.requests.with_label_values(&[endpoint, &status.to_string()]).inc();
    }

    /// Records how long restoring a session took.
    pub fn restored(&self, took: Duration) {
        self.restores.inc();
        self.restore_latency.observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric. `live` and `hibernated` are the actor gauges,
    /// `waiting` the queue's length.
    pub fn render(&self, runtime: &Runtime, live: usize, hibernated: usize, waiting: usize) -> String {
        let mut families = self.registry.gather();
        let batch = runtime.batch_stats();
        families.push(scalar(
            MetricType::COUNTER,
            "driftwood_batched_decode_passes_total",
            "Decode passes that carried more than one session.",
            batch.batched_passes as f64,
        ));
        families.push(scalar(
            MetricType::COUNTER,
            "driftwood_batched_decode_sequences_total",
            "Sequences carried by batched decode passes.",
            batch.batched_sequences as f64,
        ));
        families.push(scalar(
            MetricType::COUNTER,
            "driftwood_decode_pass_seconds_total",
            "Time spent in decode passes (continuous batching).",
            batch.pass_nanos as f64 * 1e-9,
        ));
        families.push(scalar(
            MetricType::GAUGE,
            "driftwood_actors_active",
            "Session actors live in memory.",
            live as f64,
        ));
        families.push(scalar(
            MetricType::GAUGE,
            "driftwood_actors_hibernated",
            "Sessions held only as a snapshot in the store.",
            hibernated as f64,
        ));
        families.push(scalar(
            MetricType::GAUGE,
            "driftwood_queue_waiting",
            "Requests waiting for a worker.",
            waiting as f64,
        ));
        let ledger = runtime.ledger();
        let mut copied = family(
            MetricType::COUNTER,
            "driftwood_copy_ledger_bytes",
            "Bytes copied between actor memory and anything else, by kind.",
        );
        copied.set_metric(
            [("tensor", ledger.tensor_bytes), ("text", ledger.text_bytes), ("snapshot", ledger.snapshot_bytes)]
                .into_iter()
                .map(|(kind, bytes)| {
                    let mut m = counter_metric(bytes as f64);
                    m.set_label(vec![label("kind", kind)]);
                    m
                })
                .collect(),
        );
        families.push(copied);
        // Every decode pass of the batcher by the sessions it carried (size 1 included); sum / count is the
        // mean batch size. The runtime counts passes per bucket; the exposition's buckets are cumulative.
        let mut cumulative = 0;
        let buckets = BATCH_SIZE_BOUNDS
            .iter()
            .zip(batch.sizes)
            .map(|(&bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(bound as f64);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_count(batch.passes);
        h.set_sample_sum(batch.sequences as f64);
        let mut m = proto::Metric::default();
        m.set_histogram(h);
        let mut sizes = family(
            MetricType::HISTOGRAM,
            "driftwood_decode_batch_size",
            "Sessions per decode pass (continuous batching).",
        );
        sizes.set_metric(vec![m]);
        families.push(sizes);
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Encoding checks each family (a name, at least one sample); those built here all pass, so a failure
        // is a bug, shown in the text rather than a half-written exposition.
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            return format!("# error encoding the metrics: {e}\n");
        }
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// An empty family of `kind` named `name`.
fn family(kind: MetricType, name: &str, help: &str) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f
}

/// A family of one unlabelled counter or gauge.
fn scalar(kind: MetricType, name: &str, help: &str, value: f64) -> MetricFamily {
    let mut f = family(kind, name, help);
    let m = if kind == MetricType::GAUGE {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        proto::Metric::from_gauge(g)
    } else {
        counter_metric(value)
    };
    f.set_metric(vec![m]);
    f
}

fn counter_metric(value: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(value);
    let mut m = proto::Metric::default();
    m.set_counter(c);
    m
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}
