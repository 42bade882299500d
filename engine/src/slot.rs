//! A block the engine holds: its identity, and the copies of it on each tier.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use mooncake_kv_tiers::{DramTier, Extent, HbmTier, NvmeTier, Tier};
use parking_lot::RwLock;

use crate::eviction::EntryId;
use crate::meta::MapEntry;

/// Marks a slot that is not (or no longer) tracked by a tier's eviction policy.
pub(crate) const NOT_RESIDENT: EntryId = EntryId::MAX;
/// Index of the DRAM tier in per-tier arrays.
pub(crate) const DRAM: usize = 0;
/// Index of the NVMe tier in per-tier arrays.
pub(crate) const NVME: usize = 1;
/// Index of the HBM tier in per-tier arrays.
pub(crate) const HBM: usize = 2;
/// Tiers in per-tier arrays.
pub(crate) const TIERS: usize = 3;

/// One block. Shared by the index, the residency tables and readers through `Arc`. Its
/// identity (key, generation, payload length and CRC) never changes; which tiers hold a copy
/// does, under `locations`. Each copy frees its extent when the last `Arc` to it goes, so a
/// reader that took a copy can always finish reading it, even if the block moved or was
/// removed meanwhile.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) key: Box<[u8]>,
    /// The index's hash of `key`, kept so the index can grow without rehashing keys.
    pub(crate) hash: u64,
    /// Unique across the engine's life (and across restarts): identifies this block.
    pub(crate) generation: u64,
    pub(crate) payload_len: u32,
    pub(crate) payload_crc32: u32,
    /// Readers holding a pin. A pinned block is neither evicted nor moved; the count only
    /// changes under a read lock of the block's index shard and is checked under its write lock.
    pub(crate) pins: AtomicU32,
    /// This slot's id in each tier's residency table, or [`NOT_RESIDENT`].
    pub(crate) entries: [AtomicU32; TIERS],
    pub(crate) locations: RwLock<Locations>,
    /// Where the block sits in its prefix chain, for the eviction policies.
    pub(crate) lineage: Lineage,
}

/// A block's place in its prefix chain, as far as the engine knows.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    /// The parent block as it was when this one was put (the previous block of the chain).
    /// Weak: a child never keeps its parent's bytes or key alive.
    pub(crate) parent: Option<Weak<Slot>>,
    /// Blocks before this one in the chain: 0 for a head or an unlinked block; 1 when the
    /// parent was named but not held.
    pub(crate) depth: u32,
}

impl Lineage {
    /// The lineage of a child of `parent`.
    pub(crate) fn child_of(parent: &Arc<Slot>) -> Self {
        Self {
            parent: Some(Arc::downgrade(parent)),
            depth: parent.lineage.depth.saturating_add(1),
        }
    }

    /// The lineage of a block whose parent was named but is not held.
    pub(crate) fn orphan() -> Self {
        Self {
            parent: None,
            depth: 1,
        }
    }
}

/// The copies of a block. At least one is present while the block is in the index.
#[derive(Debug, Clone, Default)]
pub(crate) struct Locations {
    pub(crate) dram: Option<Arc<DramCopy>>,
    pub(crate) nvme: Option<Arc<NvmeCopy>>,
    pub(crate) hbm: Option<Arc<HbmCopy>>,
}

impl Slot {
    pub(crate) fn new(
        key: &[u8],
        hash: u64,
        generation: u64,
        payload_len: u32,
        payload_crc32: u32,
        locations: Locations,
        lineage: Lineage,
    ) -> Self {
        Self {
            key: key.into(),
            hash,
            generation,
            payload_len,
            payload_crc32,
            pins: AtomicU32::new(0),
            entries: [const { AtomicU32::new(NOT_RESIDENT) }; TIERS],
            locations: RwLock::new(locations),
            lineage,
        }
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    pub(crate) fn dram(&self) -> Option<Arc<DramCopy>> {
        self.locations.read().dram.clone()
    }

    pub(crate) fn nvme(&self) -> Option<Arc<NvmeCopy>> {
        self.locations.read().nvme.clone()
    }

    pub(crate) fn hbm(&self) -> Option<Arc<HbmCopy>> {
        self.locations.read().hbm.clone()
    }
}

/// A block's bytes in the DRAM tier, in the block format with 64-byte payload alignment.
#[derive(Debug)]
pub(crate) struct DramCopy {
    /// Always `Some` until drop.
    extent: Option<Extent>,
    tier: Arc<DramTier>,
    pub(crate) payload_offset: u32,
}

impl DramCopy {
    pub(crate) fn new(extent: Extent, tier: Arc<DramTier>, payload_offset: u32) -> Self {
        Self {
            extent: Some(extent),
            tier,
            payload_offset,
        }
    }

    /// The whole extent's bytes, in place.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.tier.bytes(self.extent())
    }

    /// The whole extent's bytes, writable: only before the copy is shared.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let extent = self
            .extent
            .as_mut()
            .expect("a copy holds its extent until drop");
        self.tier.bytes_mut(extent)
    }

    pub(crate) fn extent_len_bytes(&self) -> u64 {
        self.extent().len_bytes()
    }

    /// Where the block starts in the DRAM region.
    pub(crate) fn offset_bytes(&self) -> u64 {
        self.extent().offset_bytes()
    }

    fn extent(&self) -> &Extent {
        self.extent
            .as_ref()
            .expect("a copy holds its extent until drop")
    }
}

impl Drop for DramCopy {
    fn drop(&mut self) {
        if let Some(extent) = self.extent.take() {
            self.tier.free(extent);
        }
    }
}

/// A block's bytes in the HBM tier, in the block format with 64-byte payload alignment (as in
/// DRAM).
#[derive(Debug)]
pub(crate) struct HbmCopy {
    extent: Option<Extent>,
    pub(crate) tier: Arc<HbmTier>,
    pub(crate) payload_offset: u32,
    pub(crate) block_len: u32,
}

impl HbmCopy {
    pub(crate) fn new(
        extent: Extent,
        tier: Arc<HbmTier>,
        payload_offset: u32,
        block_len: u32,
    ) -> Self {
        Self {
            extent: Some(extent),
            tier,
            payload_offset,
            block_len,
        }
    }

    pub(crate) fn extent(&self) -> &Extent {
        self.extent
            .as_ref()
            .expect("a copy holds its extent until drop")
    }

    pub(crate) fn extent_len_bytes(&self) -> u64 {
        self.extent().len_bytes()
    }

    /// The extent, writable: only before the copy is shared.
    pub(crate) fn extent_mut(&mut self) -> &mut Extent {
        self.extent
            .as_mut()
            .expect("a copy holds its extent until drop")
    }
}

impl Drop for HbmCopy {
    fn drop(&mut self) {
        if let Some(extent) = self.extent.take() {
            self.tier.free(extent);
        }
    }
}

/// A block's bytes on the NVMe tier, in the block format with 4 KiB payload alignment, and
/// the map entry that points at them.
///
/// Dropping it frees the extent for reuse, so the engine drops the last reference only after
/// the map entry is deleted durably (or was never committed).
#[derive(Debug)]
pub(crate) struct NvmeCopy {
    extent: Option<Extent>,
    tier: Arc<NvmeTier>,
    pub(crate) entry: MapEntry,
}

impl NvmeCopy {
    pub(crate) fn new(extent: Extent, tier: Arc<NvmeTier>, entry: MapEntry) -> Self {
        Self {
            extent: Some(extent),
            tier,
            entry,
        }
    }

    pub(crate) fn extent(&self) -> &Extent {
        self.extent
            .as_ref()
            .expect("a copy holds its extent until drop")
    }
}

impl Drop for NvmeCopy {
    fn drop(&mut self) {
        if let Some(extent) = self.extent.take() {
            self.tier.free(extent);
        }
    }
}
