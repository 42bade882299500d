//! A block the engine holds: its identity, and the copies of it on each tier.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use mooncake_kv_tiers::{DramTier, Extent, HbmTier, NvmeTier, Tier, TierKind};
use parking_lot::RwLock;

use crate::eviction::EntryId;
use crate::meta::MapEntry;

/// Marks a slot that is not (or no longer) tracked by a tier's eviction policy.
pub(crate) const NOT_RESIDENT: EntryId = EntryId::MAX;
/// A tier, by its place in the hierarchy: a block moves down it (HBM, then DRAM, then NVMe)
/// when a tier passes its high watermark, and up it on hits. Indexes the engine's per-tier
/// arrays; an engine without HBM or NVMe leaves their entries unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Level {
    /// GPU memory, above DRAM (with an HBM tier).
    Hbm = 0,
    /// Host memory: every engine has it.
    Dram = 1,
    /// The data directory's file (with a data directory).
    Nvme = 2,
}

impl Level {
    /// Every level, fastest first.
    pub(crate) const ALL: [Level; LEVELS] = [Level::Hbm, Level::Dram, Level::Nvme];

    /// This level's place in per-tier arrays.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The medium at this level.
    pub(crate) const fn kind(self) -> TierKind {
        match self {
            Level::Hbm => TierKind::Hbm,
            Level::Dram => TierKind::Dram,
            Level::Nvme => TierKind::Nvme,
        }
    }
}

/// Levels in per-tier arrays.
pub(crate) const LEVELS: usize = 3;

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
    pub(crate) entries: [AtomicU32; LEVELS],
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
    /// The block ends its chain short of a full block ([`ChainEnd::Partial`]).
    ///
    /// [`ChainEnd::Partial`]: crate::ChainEnd::Partial
    pub(crate) partial: bool,
}

impl Lineage {
    /// The lineage of a child of `parent`.
    pub(crate) fn child_of(parent: &Arc<Slot>) -> Self {
        Self {
            parent: Some(Arc::downgrade(parent)),
            depth: parent.lineage.depth.saturating_add(1),
            partial: false,
        }
    }

    /// The lineage of a block whose parent was named but is not held.
    pub(crate) fn orphan() -> Self {
        Self {
            parent: None,
            depth: 1,
            partial: false,
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

impl Locations {
    /// Whether there is a copy on `level`.
    pub(crate) fn has(&self, level: Level) -> bool {
        match level {
            Level::Hbm => self.hbm.is_some(),
            Level::Dram => self.dram.is_some(),
            Level::Nvme => self.nvme.is_some(),
        }
    }

    /// Whether there is a copy anywhere.
    pub(crate) fn any(&self) -> bool {
        Level::ALL.into_iter().any(|level| self.has(level))
    }
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
            entries: [const { AtomicU32::new(NOT_RESIDENT) }; LEVELS],
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

    /// This slot's id in the residency table of `level`.
    pub(crate) fn entry(&self, level: Level) -> EntryId {
        self.entries[level.index()].load(Ordering::Relaxed)
    }

    /// Bytes of the extent the block's copy on `level` holds; 0 without one.
    pub(crate) fn extent_len_bytes(&self, level: Level) -> u64 {
        let locations = self.locations.read();
        match level {
            Level::Hbm => locations.hbm.as_ref().map_or(0, |c| c.extent_len_bytes()),
            Level::Dram => locations.dram.as_ref().map_or(0, |c| c.extent_len_bytes()),
            Level::Nvme => locations
                .nvme
                .as_ref()
                .map_or(0, |c| c.entry.extent_len_bytes),
        }
    }
}

/// A block's bytes in the DRAM tier, in the block format with 64-byte payload alignment.
///
/// A payload of [`PAGE_ALIGNED_PAYLOAD_MIN`] bytes or more also starts on a page: the block
/// begins up to a page less 64 bytes into its extent (which [`dram_extent_len`] makes that
/// much longer), so that its payload lands on a 4 KiB boundary of the region, in every
/// process that maps it. Copies of that size between buffers at different offsets in a page
/// run about 10% slower (glibc's large copies; measured with 2 and 4 MiB values).
#[derive(Debug)]
pub(crate) struct DramCopy {
    /// Always `Some` until drop.
    extent: Option<Extent>,
    tier: Arc<DramTier>,
    /// Where the block starts in the extent.
    block_start: u32,
    pub(crate) payload_offset: u32,
}

/// Payloads at least this long start on a page in DRAM (see [`DramCopy`]).
pub(crate) const PAGE_ALIGNED_PAYLOAD_MIN: usize = 1 << 20;
const PAGE_BYTES: u64 = 4096;

/// Bytes of DRAM to reserve for a block of `block_len` bytes whose payload is `payload_len`
/// bytes: the block, and room to move it so that a large payload starts on a page.
pub(crate) fn dram_extent_len(block_len: usize, payload_len: usize) -> u64 {
    let slack = if payload_len >= PAGE_ALIGNED_PAYLOAD_MIN {
        PAGE_BYTES - 64
    } else {
        0
    };
    block_len as u64 + slack
}

impl DramCopy {
    /// A copy in `extent` (of [`dram_extent_len`] bytes) for a block whose payload, of
    /// `payload_len` bytes, starts `payload_offset` bytes into it.
    pub(crate) fn new(
        extent: Extent,
        tier: Arc<DramTier>,
        payload_offset: u32,
        payload_len: usize,
    ) -> Self {
        let block_start = if payload_len >= PAGE_ALIGNED_PAYLOAD_MIN {
            // A multiple of 64 below a page: extents and payload offsets are multiples of 64.
            let payload_at = extent.offset_bytes() + u64::from(payload_offset);
            (PAGE_BYTES - payload_at % PAGE_BYTES) % PAGE_BYTES
        } else {
            0
        };
        debug_assert!(
            block_start + u64::from(payload_offset) + payload_len as u64 <= extent.len_bytes()
        );
        Self {
            extent: Some(extent),
            tier,
            block_start: block_start as u32,
            payload_offset,
        }
    }

    /// The block's bytes in place, from its header to the end of the extent.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.tier.bytes(self.extent())[self.block_start as usize..]
    }

    /// The block's bytes, writable: only before the copy is shared.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let start = self.block_start as usize;
        let extent = self
            .extent
            .as_mut()
            .expect("a copy holds its extent until drop");
        &mut self.tier.bytes_mut(extent)[start..]
    }

    pub(crate) fn extent_len_bytes(&self) -> u64 {
        self.extent().len_bytes()
    }

    /// Where the block starts in the DRAM region.
    pub(crate) fn offset_bytes(&self) -> u64 {
        self.extent().offset_bytes() + u64::from(self.block_start)
    }

    fn extent(&self) -> &Extent {
        self.extent
            .as_ref()
            .expect("a copy holds its extent until drop")
    }
}

impl Drop for DramCopy {
    fn drop(&mut self) {
        if let Some(mut extent) = self.extent.take() {
            // The tier zeroes the extent's first bytes when it is freed, so that a reader
            // holding a stale descriptor sees the header stop matching before the space is
            // reused (docs/format.md, "Reading a block in place"). A block moved into its
            // extent has its header further in: zero that too, before the free that orders it.
            let start = self.block_start as usize;
            if start > 0 {
                self.tier.bytes_mut(&mut extent)[start..start + crate::format::HEADER_BYTES]
                    .fill(0);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_kv_tiers::{DramConfig, HugePages};

    fn tier() -> Arc<DramTier> {
        Arc::new(
            DramTier::open(DramConfig {
                capacity_bytes: 16 << 20,
                huge_pages: HugePages::Off,
                ..DramConfig::default()
            })
            .expect("open a DRAM tier"),
        )
    }

    /// A large payload starts on a page wherever its extent lies; a small one stays at the
    /// extent's start. Freeing a moved block zeroes its header, where a stale reader looks.
    #[test]
    fn large_payloads_start_on_a_page_and_a_freed_moved_header_is_zeroed() {
        let tier = tier();
        let (key, payload_offset) = (b"key", format_offset());
        // Small blocks first, so that the next extents start at 512-byte offsets off a page.
        for (small, payload_len) in [(512u64, 100usize), (1536, 1000)] {
            let extent = tier.allocate(small).expect("room");
            let copy = DramCopy::new(extent, Arc::clone(&tier), payload_offset, payload_len);
            assert_eq!(copy.block_start, 0, "a small block is not moved");
            // Keep the space taken for the rest of the test.
            std::mem::forget(copy);
        }
        let payload_len = PAGE_ALIGNED_PAYLOAD_MIN;
        let block_len = payload_offset as usize + payload_len;
        let extent = tier
            .allocate(dram_extent_len(block_len, payload_len))
            .expect("room");
        let extent_offset = extent.offset_bytes();
        assert_ne!(
            extent_offset % PAGE_BYTES,
            0,
            "the test needs an unaligned extent"
        );
        let mut copy = DramCopy::new(extent, Arc::clone(&tier), payload_offset, payload_len);
        assert_eq!(
            (copy.offset_bytes() + u64::from(payload_offset)) % PAGE_BYTES,
            0
        );
        let start = copy.block_start as usize;
        assert!(start > 0 && start + block_len <= copy.extent_len_bytes() as usize);
        let payload_at = copy.bytes()[payload_offset as usize..].as_ptr() as usize;
        assert_eq!(
            payload_at % PAGE_BYTES as usize,
            0,
            "in this process's mapping too"
        );
        let written =
            crate::format::encode_into(copy.bytes_mut(), key, &vec![7; payload_len], 1, 64)
                .expect("encode");
        assert_eq!(written, block_len);
        drop(copy);
        // The same space again (best fit, lowest start): the moved header is gone.
        let mut again = tier
            .allocate(dram_extent_len(block_len, payload_len))
            .expect("room");
        assert_eq!(again.offset_bytes(), extent_offset);
        let bytes = tier.bytes_mut(&mut again);
        assert!(
            bytes[start..start + crate::format::HEADER_BYTES]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(
            bytes[start + crate::format::HEADER_BYTES],
            key[0],
            "only the header"
        );
    }

    fn format_offset() -> u32 {
        crate::format::payload_offset(3, 64) as u32
    }
}
