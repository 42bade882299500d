//! Engine configuration: one plain struct, documented defaults, validated once in
//! [`Engine::open`](crate::Engine::open).

use std::path::PathBuf;

use mooncake_kv_tiers::{HugePages, IoBackendKind};

use crate::{Error, EvictionPolicyKind, Result};

/// How an [`Engine`](crate::Engine) is set up. Every field has a default that works on a
/// laptop; [`EngineConfig::default`] is a valid config.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Size of the DRAM tier. Default: 1 GiB. A multiple of 4 KiB, at least 1 MiB.
    pub dram_capacity_bytes: u64,
    /// Huge pages for the DRAM region. Default: [`HugePages::Auto`] (use them when the system
    /// has them, fall back cleanly when it does not).
    pub dram_huge_pages: HugePages,
    /// Fault in the whole DRAM region at open so first writes take no page faults. Default:
    /// false.
    pub dram_populate: bool,
    /// When DRAM usage rises above this share of capacity, blocks are evicted until usage is
    /// at most `low_watermark_percent`. Default: 95. From 1 to 100, above the low mark.
    pub high_watermark_percent: u8,
    /// Where eviction stops. Default: 85. From 0 to 99, below the high mark.
    pub low_watermark_percent: u8,
    /// Which blocks go first, in DRAM and on NVMe. Default:
    /// [`EvictionPolicyKind::Adaptive`] (it learns the balance of recency and frequency from
    /// the workload instead of constants fitted on one trace; `kvctl replay` measures any
    /// trace).
    pub eviction_policy: EvictionPolicyKind,
    /// Whether adaptive and prefix-aware eviction hold a block while a later block of its chain is
    /// resident (the rule that keeps what one cache holds of a chain a prefix). Default:
    /// true. A member of a cluster holds only its share of each chain (the cluster client
    /// places each block by its own key), and there the rule keeps blocks that other members'
    /// evictions already cut off from their prefix: `mooncake-kvd` turns it off when it has
    /// peers. Chain links still serve `end_chain` either way.
    pub hold_chain_parents: bool,
    /// Number of independently locked shards of the key index. Default: 64. A power of two
    /// from 1 to 4096; more shards, less contention between threads.
    pub index_shards: usize,
    /// Seed of the key index's hash. Default: none, a random seed per engine, so that keys
    /// sent over the network cannot be chosen to collide. The eviction policies remember keys
    /// by this hash (ghosts, sketches, the adaptive policy's sample of keys), so under a
    /// random seed their collisions differ from run to run, and so do hit ratios by a few
    /// tenths of a point; a fixed seed makes a run repeat exactly (`kvctl replay` sets one).
    /// Not for an engine that serves untrusted keys.
    pub index_hash_seed: Option<u64>,
    /// Also check the payload CRC on every DRAM read (the header and key are always checked).
    /// Default: false, because DRAM is not a medium that decays and the check costs a pass
    /// over the bytes; blocks read from NVMe or a peer are always fully checked.
    pub verify_payload_on_dram_read: bool,
    /// The data directory: NVMe data file, metadata, lock. Default: none, and the engine is
    /// DRAM only (nothing persists). With one, blocks are demoted to NVMe when DRAM passes its
    /// high watermark, and every block persisted there is served again after a restart.
    pub data_dir: Option<PathBuf>,
    /// Size of the NVMe data file, preallocated when the directory is created. Default: 4 GiB.
    /// A multiple of 4 KiB, at least 1 MiB. Must match an existing directory's.
    pub nvme_capacity_bytes: u64,
    /// When NVMe usage rises above this share of `nvme_capacity_bytes`, the background
    /// reclaimer evicts the coldest NVMe blocks until usage is at most
    /// `nvme_low_watermark_percent`. Default: 95. From 1 to 100, above the low mark.
    pub nvme_high_watermark_percent: u8,
    /// Where NVMe eviction stops. Default: 85. Below the high mark.
    pub nvme_low_watermark_percent: u8,
    /// NVMe I/O backend. Default: [`IoBackendKind::Auto`] (io_uring, else pread/pwrite with a
    /// warning and a flag in stats).
    pub nvme_io_backend: IoBackendKind,
    /// NVMe operations in flight per ring. Default: 64. From 1 to 4096.
    pub nvme_io_depth: u32,
    /// Copy a block read from NVMe into DRAM when DRAM has room below its high watermark;
    /// when it has none, the background reclaimer brings DRAM down to its low watermark so
    /// that later hits find room (a hit never evicts by itself). Default: true.
    pub promote_on_hit: bool,
    /// A GPU memory (HBM) tier above DRAM. Default: none. Needs a build with the `cuda`
    /// feature and a usable NVIDIA GPU; otherwise [`Engine::open`](crate::Engine::open) fails
    /// before creating anything.
    pub hbm: Option<HbmSettings>,
}

/// The HBM tier: blocks are put into GPU memory first, demoted to DRAM (and from there to
/// NVMe) when it fills, and promoted back on hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbmSettings {
    /// CUDA device ordinal. Default: 0.
    pub device: usize,
    /// GPU memory the tier takes at open. Default: 1 GiB. A multiple of 4 KiB, at least 1 MiB,
    /// no more than the GPU has free.
    pub capacity_bytes: u64,
    /// When usage passes this share of the capacity, the coldest blocks are demoted to DRAM
    /// until usage is at most `low_watermark_percent`. Default: 95.
    pub high_watermark_percent: u8,
    /// Where demotion stops. Default: 85. Below the high mark.
    pub low_watermark_percent: u8,
    /// Copy a block read from DRAM or NVMe into HBM when HBM has room below its high
    /// watermark. Default: true.
    pub promote_on_hit: bool,
}

impl Default for HbmSettings {
    fn default() -> Self {
        Self {
            device: 0,
            capacity_bytes: 1 << 30,
            high_watermark_percent: 95,
            low_watermark_percent: 85,
            promote_on_hit: true,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            dram_capacity_bytes: 1 << 30,
            dram_huge_pages: HugePages::Auto,
            dram_populate: false,
            high_watermark_percent: 95,
            low_watermark_percent: 85,
            eviction_policy: EvictionPolicyKind::Adaptive,
            hold_chain_parents: true,
            index_shards: 64,
            index_hash_seed: None,
            verify_payload_on_dram_read: false,
            data_dir: None,
            nvme_capacity_bytes: 4 << 30,
            nvme_high_watermark_percent: 95,
            nvme_low_watermark_percent: 85,
            nvme_io_backend: IoBackendKind::Auto,
            nvme_io_depth: 64,
            promote_on_hit: true,
            hbm: None,
        }
    }
}

impl EngineConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.dram_capacity_bytes < 1 << 20 || self.dram_capacity_bytes % 4096 != 0 {
            return bad(
                "dram_capacity_bytes",
                format!(
                    "{} is not a multiple of 4 KiB of at least 1 MiB",
                    self.dram_capacity_bytes
                ),
            );
        }
        if !(1..=100).contains(&self.high_watermark_percent) {
            return bad(
                "high_watermark_percent",
                format!("{} is not from 1 to 100", self.high_watermark_percent),
            );
        }
        if self.low_watermark_percent >= self.high_watermark_percent {
            return bad(
                "low_watermark_percent",
                format!(
                    "{} is not below high_watermark_percent ({})",
                    self.low_watermark_percent, self.high_watermark_percent
                ),
            );
        }
        if !self.index_shards.is_power_of_two() || self.index_shards > 4096 {
            return bad(
                "index_shards",
                format!("{} is not a power of two from 1 to 4096", self.index_shards),
            );
        }
        if self.data_dir.is_some()
            && (self.nvme_capacity_bytes < 1 << 20 || self.nvme_capacity_bytes % 4096 != 0)
        {
            return bad(
                "nvme_capacity_bytes",
                format!(
                    "{} is not a multiple of 4 KiB of at least 1 MiB",
                    self.nvme_capacity_bytes
                ),
            );
        }
        if !(1..=100).contains(&self.nvme_high_watermark_percent) {
            return bad(
                "nvme_high_watermark_percent",
                format!("{} is not from 1 to 100", self.nvme_high_watermark_percent),
            );
        }
        if self.nvme_low_watermark_percent >= self.nvme_high_watermark_percent {
            return bad(
                "nvme_low_watermark_percent",
                format!(
                    "{} is not below nvme_high_watermark_percent ({})",
                    self.nvme_low_watermark_percent, self.nvme_high_watermark_percent
                ),
            );
        }
        if !(1..=4096).contains(&self.nvme_io_depth) {
            return bad(
                "nvme_io_depth",
                format!("{} is not from 1 to 4096", self.nvme_io_depth),
            );
        }
        if let Some(hbm) = &self.hbm {
            if hbm.capacity_bytes < 1 << 20 || hbm.capacity_bytes % 4096 != 0 {
                return bad(
                    "hbm.capacity_bytes",
                    format!(
                        "{} is not a multiple of 4 KiB of at least 1 MiB",
                        hbm.capacity_bytes
                    ),
                );
            }
            if !(1..=100).contains(&hbm.high_watermark_percent) {
                return bad(
                    "hbm.high_watermark_percent",
                    format!("{} is not from 1 to 100", hbm.high_watermark_percent),
                );
            }
            if hbm.low_watermark_percent >= hbm.high_watermark_percent {
                return bad(
                    "hbm.low_watermark_percent",
                    format!(
                        "{} is not below hbm.high_watermark_percent ({})",
                        hbm.low_watermark_percent, hbm.high_watermark_percent
                    ),
                );
            }
        }
        Ok(())
    }

    pub(crate) fn hbm_watermark_bytes(&self) -> (u64, u64) {
        self.hbm.as_ref().map_or((u64::MAX, u64::MAX), |h| {
            (
                percent_of(h.capacity_bytes, h.high_watermark_percent),
                percent_of(h.capacity_bytes, h.low_watermark_percent),
            )
        })
    }

    pub(crate) fn high_watermark_bytes(&self) -> u64 {
        percent_of(self.dram_capacity_bytes, self.high_watermark_percent)
    }

    pub(crate) fn low_watermark_bytes(&self) -> u64 {
        percent_of(self.dram_capacity_bytes, self.low_watermark_percent)
    }

    pub(crate) fn nvme_high_watermark_bytes(&self) -> u64 {
        percent_of(self.nvme_capacity_bytes, self.nvme_high_watermark_percent)
    }

    pub(crate) fn nvme_low_watermark_bytes(&self) -> u64 {
        percent_of(self.nvme_capacity_bytes, self.nvme_low_watermark_percent)
    }
}

/// `percent` percent of `bytes`, rounded down: 100% is all of it. (Dividing first, as this
/// did, rounded 100% of a capacity that is not a multiple of 100 below the capacity, so a
/// full tier was over its "100%" high watermark and was brought down to its low one.)
fn percent_of(bytes: u64, percent: u8) -> u64 {
    // At most bytes when percent <= 100 (validated); saturates otherwise.
    u64::try_from(u128::from(bytes) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_of_100_percent_is_the_whole_capacity() {
        // 208 extents of 8,704 bytes: not a multiple of 100.
        let config = EngineConfig {
            dram_capacity_bytes: 1_810_432,
            high_watermark_percent: 100,
            low_watermark_percent: 99,
            ..EngineConfig::default()
        };
        assert_eq!(config.high_watermark_bytes(), 1_810_432);
        assert_eq!(config.low_watermark_bytes(), 1_792_327);
        assert_eq!(percent_of(u64::MAX, 100), u64::MAX);
        assert_eq!(percent_of(u64::MAX, 50), u64::MAX / 2);
        assert_eq!(percent_of(99, 1), 0);
    }

    #[test]
    fn default_is_valid() {
        EngineConfig::default().validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: [(EngineConfig, &str); 6] = [
            (
                EngineConfig {
                    dram_capacity_bytes: 4096,
                    ..Default::default()
                },
                "dram_capacity_bytes",
            ),
            (
                EngineConfig {
                    dram_capacity_bytes: (1 << 20) + 1,
                    ..Default::default()
                },
                "dram_capacity_bytes",
            ),
            (
                EngineConfig {
                    high_watermark_percent: 101,
                    ..Default::default()
                },
                "high_watermark_percent",
            ),
            (
                EngineConfig {
                    low_watermark_percent: 95,
                    ..Default::default()
                },
                "low_watermark_percent",
            ),
            (
                EngineConfig {
                    index_shards: 3,
                    ..Default::default()
                },
                "index_shards",
            ),
            (
                EngineConfig {
                    index_shards: 8192,
                    ..Default::default()
                },
                "index_shards",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
    }
}
