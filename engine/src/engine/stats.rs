//! Counters the roles bump as they work, and the figures [`Engine::stats`] reports.
//!
//! [`Engine::stats`]: super::Engine::stats

use std::sync::atomic::{AtomicU64, Ordering};

use mooncake_kv_tiers::{HugePageMode, TierKind};

use super::Inner;
use crate::slot::{LEVELS, Level};

#[derive(Debug, Default)]
pub(super) struct TierCounters {
    blocks: AtomicU64,
    payload_bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    tiers: [TierCounters; LEVELS],
    puts: AtomicU64,
    removes: AtomicU64,
    demotions: AtomicU64,
    promotions: AtomicU64,
    corrupt_blocks: AtomicU64,
}

/// Each counter goes up by one event (or `n`), relaxed: they are figures, ordering nothing.
impl Counters {
    /// The counters of `level`.
    pub(super) fn tier(&self, level: Level) -> &TierCounters {
        &self.tiers[level.index()]
    }

    pub(super) fn put(&self) {
        self.puts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn remove(&self) {
        self.removes.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn demotions(&self, n: u64) {
        self.demotions.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn promotion(&self) {
        self.promotions.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn corrupt_block(&self) {
        self.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
    }
}

impl TierCounters {
    pub(super) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn eviction(&self) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
    }

    /// A block with `payload_bytes` arrived on the tier.
    pub(super) fn arrived(&self, payload_bytes: u64) {
        self.blocks.fetch_add(1, Ordering::Relaxed);
        self.payload_bytes
            .fetch_add(payload_bytes, Ordering::Relaxed);
    }

    /// A block with `payload_bytes` left the tier.
    pub(super) fn left(&self, payload_bytes: u64) {
        self.blocks.fetch_sub(1, Ordering::Relaxed);
        self.payload_bytes
            .fetch_sub(payload_bytes, Ordering::Relaxed);
    }
}

/// Figures for one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierStats {
    /// The medium.
    pub kind: TierKind,
    /// Bytes the tier manages.
    pub capacity_bytes: u64,
    /// Bytes in allocated extents (blocks, their headers and rounding, and blocks evicted
    /// but still being read).
    pub used_bytes: u64,
    /// The largest block that fits now without evicting.
    pub largest_free_bytes: u64,
    /// Separate free extents: many, small ones mean fragmentation.
    pub free_extents: u64,
    /// Blocks with a copy on this tier.
    pub blocks: u64,
    /// Payload bytes of those blocks.
    pub payload_bytes: u64,
    /// Reads served from this tier.
    pub hits: u64,
    /// Reads that reached this tier and did not find their block on it.
    pub misses: u64,
    /// Copies dropped from this tier to make room (demoted ones included).
    pub evictions: u64,
}

/// Figures for the whole engine, from [`Engine::stats`](crate::Engine::stats).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// One entry per tier, fastest first.
    pub tiers: Vec<TierStats>,
    /// Successful puts.
    pub puts: u64,
    /// Blocks removed by `remove`.
    pub removes: u64,
    /// Blocks written from DRAM to NVMe to make room in DRAM.
    pub demotions: u64,
    /// Blocks copied from NVMe into DRAM on a read.
    pub promotions: u64,
    /// Blocks that failed verification on a read; each is reported once, dropped, never served.
    pub corrupt_blocks: u64,
    /// What pages the DRAM region got.
    pub huge_pages: HugePageMode,
    /// The NVMe tier's I/O backend (`"io_uring"` or `"psync"`), if there is a tier.
    pub nvme_io_backend: Option<&'static str>,
    /// Whether io_uring was unavailable and the NVMe tier fell back to psync.
    pub nvme_io_fell_back: bool,
}

impl Inner {
    pub(super) fn stats(&self) -> EngineStats {
        let c = &self.counters;
        // Fastest first, as the field promises.
        let tiers = self
            .levels()
            .filter_map(|level| {
                let usage = self.medium(level)?.usage();
                let counts = c.tier(level);
                Some(TierStats {
                    kind: level.kind(),
                    capacity_bytes: usage.capacity_bytes,
                    used_bytes: usage.used_bytes,
                    largest_free_bytes: usage.largest_free_bytes,
                    free_extents: usage.free_extents,
                    blocks: counts.blocks.load(Ordering::Relaxed),
                    payload_bytes: counts.payload_bytes.load(Ordering::Relaxed),
                    hits: counts.hits.load(Ordering::Relaxed),
                    misses: counts.misses.load(Ordering::Relaxed),
                    evictions: counts.evictions.load(Ordering::Relaxed),
                })
            })
            .collect();
        EngineStats {
            tiers,
            puts: c.puts.load(Ordering::Relaxed),
            removes: c.removes.load(Ordering::Relaxed),
            demotions: c.demotions.load(Ordering::Relaxed),
            promotions: c.promotions.load(Ordering::Relaxed),
            corrupt_blocks: c.corrupt_blocks.load(Ordering::Relaxed),
            huge_pages: self.dram.huge_page_mode(),
            nvme_io_backend: self.store.as_ref().map(|s| s.tier.io_backend_name()),
            nvme_io_fell_back: self.store.as_ref().is_some_and(|s| s.tier.fell_back()),
        }
    }
}
