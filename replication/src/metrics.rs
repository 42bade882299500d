//! The node's counters and latency histograms, rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mooncake_kv_engine::EngineStats;

/// Reads one figure of a tier.
type TierFigure = fn(&mooncake_kv_engine::TierStats) -> u64;

/// Request kinds, in the order of [`crate::proto::NodeStats::requests`].
pub(crate) const KINDS: [&str; 12] = crate::proto::REQUEST_KINDS;

/// Upper bounds of the latency buckets, in microseconds.
const BOUNDS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

#[derive(Debug, Default)]
struct Histogram {
    /// One per bound, plus the overflow bucket.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let at = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// The control plane's connections now, and how they are held.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnectionFigures {
    /// Connections that have authenticated.
    pub(crate) authenticated: u64,
    /// Connections that have not authenticated.
    pub(crate) unauthenticated: u64,
    /// Connections held by the event loops between requests.
    pub(crate) parked: u64,
    /// Worker threads alive.
    pub(crate) workers: u64,
}

/// Everything the node counts. Relaxed atomics: each figure is exact, a set of them read
/// together is only roughly simultaneous.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: [AtomicU64; KINDS.len()],
    latency: [Histogram; KINDS.len()],
    pub(crate) errors: AtomicU64,
    pub(crate) rejected_frames: AtomicU64,
    /// Reads clients found stale and looked up again, as they reported them.
    pub(crate) stale_reads: AtomicU64,
    /// Reads clients served from cached descriptors, as they reported them.
    pub(crate) cached_reads: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_described: AtomicU64,
    /// Connections closed because their budget was full (see `AdmissionFigures::refused`).
    pub(crate) refused_connections: AtomicU64,
    /// Connections closed for not authenticating in time.
    pub(crate) hello_timeouts: AtomicU64,
    /// Blocks a client reported damaged that the node found damaged too, and dropped.
    pub(crate) corrupt_reported: AtomicU64,
    /// Requests an event loop served in its own thread.
    pub(crate) served_in_loops: AtomicU64,
    /// Answers an event loop sent in parts, as the socket drained (it could not take them
    /// whole at once).
    pub(crate) answers_sent_in_parts: AtomicU64,
}

impl Metrics {
    pub(crate) fn record(&self, kind: usize, elapsed: Duration) {
        self.requests[kind].fetch_add(1, Ordering::Relaxed);
        self.latency[kind].observe(elapsed);
    }

    pub(crate) fn requests(&self) -> Vec<u64> {
        self.requests
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The Prometheus text exposition of the node's figures and the engine's.
    pub(crate) fn render(
        &self,
        engine: &EngineStats,
        leases: u64,
        threads: &ConnectionFigures,
        repair: Option<&crate::repair::RepairStats>,
    ) -> String {
        let mut out = String::with_capacity(8192);
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP mooncake_requests_total Control-plane requests served, by kind.\n\
             # TYPE mooncake_requests_total counter"
        );
        for (kind, count) in KINDS.iter().zip(&self.requests) {
            let _ = writeln!(
                out,
                "mooncake_requests_total{{kind=\"{kind}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mooncake_request_duration_seconds Time to serve a request, by kind.\n\
             # TYPE mooncake_request_duration_seconds histogram"
        );
        for (kind, h) in KINDS.iter().zip(&self.latency) {
            let mut cumulative = 0;
            for (i, bucket) in h.buckets.iter().enumerate() {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = BOUNDS_US
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |&us| format!("{}", us as f64 / 1e6));
                let _ = writeln!(
                    out,
                    "mooncake_request_duration_seconds_bucket{{kind=\"{kind}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "mooncake_request_duration_seconds_sum{{kind=\"{kind}\"}} {sum}\n\
                 mooncake_request_duration_seconds_count{{kind=\"{kind}\"}} {cumulative}"
            );
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "mooncake_errors_total",
            "Requests or items refused (bad input, no space, unauthorized, internal).",
            load(&self.errors),
        );
        counter(
            &mut out,
            "mooncake_rejected_frames_total",
            "Frames that failed their checks; the connection was closed.",
            load(&self.rejected_frames),
        );
        counter(
            &mut out,
            "mooncake_verification_retries_total",
            "Reads that failed verification at the client (the slot was reused or the block moved) and were looked up again, as clients reported them with their next lookup.",
            load(&self.stale_reads),
        );
        counter(
            &mut out,
            "mooncake_cached_reads_total",
            "Reads clients served from a cached descriptor, with no lookup (not in the lookup counts), as they reported them with their next lookup.",
            load(&self.cached_reads),
        );
        counter(
            &mut out,
            "mooncake_unauthorized_total",
            "Connections refused for a missing or wrong token.",
            load(&self.unauthorized),
        );
        counter(
            &mut out,
            "mooncake_put_bytes_total",
            "Value bytes received in puts.",
            load(&self.bytes_in),
        );
        counter(
            &mut out,
            "mooncake_lookup_bytes_total",
            "Block bytes described by lookups (read one-sidedly by clients).",
            load(&self.bytes_described),
        );
        gauge(
            &mut out,
            "mooncake_connections",
            "Open control connections that have authenticated.",
            threads.authenticated,
        );
        gauge(
            &mut out,
            "mooncake_unauthenticated_connections",
            "Open control connections that have not authenticated yet.",
            threads.unauthenticated,
        );
        gauge(
            &mut out,
            "mooncake_parked_connections",
            "Open control connections with no request in flight, held by the event loops (no thread each).",
            threads.parked,
        );
        gauge(
            &mut out,
            "mooncake_worker_threads",
            "Threads serving control connections (they grow with the connections active at once, not with those open).",
            threads.workers,
        );
        counter(
            &mut out,
            "mooncake_refused_connections_total",
            "Control connections closed because their budget was full: the oldest that had not authenticated, to make room for a new one, or a Hello past the limit of authenticated connections.",
            load(&self.refused_connections),
        );
        counter(
            &mut out,
            "mooncake_corrupt_blocks_reported_total",
            "Blocks a client found damaged (the same failure on two reads in a row) that the node found damaged too, and dropped.",
            load(&self.corrupt_reported),
        );
        counter(
            &mut out,
            "mooncake_requests_served_in_loops_total",
            "Control-plane requests an event loop served in its own thread (quick ones, whole in the socket, answered without waiting); the others are served by workers.",
            load(&self.served_in_loops),
        );
        counter(
            &mut out,
            "mooncake_answers_sent_in_parts_total",
            "Answers an event loop sent in parts as the socket drained, because it could not take them whole at once (the blocks stay pinned until they are sent).",
            load(&self.answers_sent_in_parts),
        );
        counter(
            &mut out,
            "mooncake_hello_timeouts_total",
            "Control connections closed for not authenticating within the deadline.",
            load(&self.hello_timeouts),
        );
        gauge(&mut out, "mooncake_leases", "Leases held now.", leases);
        let _ = writeln!(
            out,
            "# HELP mooncake_tier_used_bytes Bytes in allocated extents, by tier.\n\
             # TYPE mooncake_tier_used_bytes gauge"
        );
        for t in &engine.tiers {
            let _ = writeln!(
                out,
                "mooncake_tier_used_bytes{{tier=\"{:?}\"}} {}",
                t.kind, t.used_bytes
            );
        }
        let per_tier: [(&str, &str, TierFigure); 4] = [
            ("mooncake_tier_capacity_bytes", "gauge", |t| {
                t.capacity_bytes
            }),
            ("mooncake_tier_blocks", "gauge", |t| t.blocks),
            ("mooncake_tier_hits_total", "counter", |t| t.hits),
            ("mooncake_tier_evictions_total", "counter", |t| t.evictions),
        ];
        for (name, kind, get) in per_tier {
            let _ = writeln!(
                out,
                "# HELP {name} See the engine's TierStats.\n# TYPE {name} {kind}"
            );
            for t in &engine.tiers {
                let _ = writeln!(out, "{name}{{tier=\"{:?}\"}} {}", t.kind, get(t));
            }
        }
        counter(
            &mut out,
            "mooncake_puts_total",
            "Blocks stored.",
            engine.puts,
        );
        if let Some(r) = repair {
            let figures = [
                (
                    "mooncake_repair_passes_total",
                    "Repair passes over this node's blocks (one per membership change).",
                    &r.passes,
                ),
                (
                    "mooncake_repair_blocks_copied_total",
                    "Blocks copied to a replica that lacked them.",
                    &r.blocks_copied,
                ),
                (
                    "mooncake_repair_bytes_copied_total",
                    "Bytes of those blocks.",
                    &r.bytes_copied,
                ),
                (
                    "mooncake_repair_failures_total",
                    "Repair copies that failed (retried at the next pass).",
                    &r.failures,
                ),
                (
                    "mooncake_reconcile_superseded_total",
                    "Blocks read back from disk at start that a live member also held: replaced by its copy, or dropped.",
                    &r.reconciled_superseded,
                ),
                (
                    "mooncake_reconcile_kept_total",
                    "Blocks read back from disk at start that no live member held: kept.",
                    &r.reconciled_kept,
                ),
            ];
            for (name, help, value) in figures {
                counter(&mut out, name, help, load(value));
            }
            gauge(
                &mut out,
                "mooncake_repair_under_replicated_blocks",
                "Replicas found missing by the current or last repair pass and not yet copied.",
                load(&r.under_replicated),
            );
            gauge(
                &mut out,
                "mooncake_repair_pending_blocks",
                "Blocks left to examine in the repair pass under way.",
                load(&r.pending),
            );
        }
        counter(
            &mut out,
            "mooncake_demotions_total",
            "Blocks written from DRAM to NVMe to make room.",
            engine.demotions,
        );
        counter(
            &mut out,
            "mooncake_promotions_total",
            "Blocks copied from NVMe into DRAM on a read.",
            engine.promotions,
        );
        counter(
            &mut out,
            "mooncake_corrupt_blocks_total",
            "Blocks that failed verification on a read (dropped, never served).",
            engine.corrupt_blocks,
        );
        out
    }
}
