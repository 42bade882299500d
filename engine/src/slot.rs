//! A resident block: its metadata and the extent holding its bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use mooncake_kv_tiers::{DramTier, Extent, Tier};

use crate::eviction::EntryId;

/// Marks a slot that is not (or no longer) tracked by the eviction policy.
pub(crate) const NOT_RESIDENT: EntryId = EntryId::MAX;

/// One block in DRAM. Shared by the index, the residency table and readers through `Arc`;
/// the extent goes back to the tier when the last of them lets go, so a reader that looked a
/// block up can always finish copying it, even if it was removed or evicted meanwhile.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) key: Box<[u8]>,
    /// The index's hash of `key`, kept so the index can grow without rehashing keys.
    pub(crate) hash: u64,
    /// Unique across the engine's life: identifies this slot in checks against reuse.
    pub(crate) generation: u64,
    pub(crate) payload_offset: u32,
    pub(crate) payload_len: u32,
    /// Readers holding a pin. A pinned slot is never evicted; the count only changes under a
    /// read lock of the slot's index shard and is checked under its write lock.
    pub(crate) pins: AtomicU32,
    /// This slot's id in the residency table, or [`NOT_RESIDENT`].
    pub(crate) entry: AtomicU32,
    /// Always `Some` until drop.
    extent: Option<Extent>,
    tier: Arc<DramTier>,
}

impl Slot {
    pub(crate) fn new(
        key: &[u8],
        hash: u64,
        generation: u64,
        payload_offset: u32,
        payload_len: u32,
        extent: Extent,
        tier: Arc<DramTier>,
    ) -> Self {
        Self {
            key: key.into(),
            hash,
            generation,
            payload_offset,
            payload_len,
            pins: AtomicU32::new(0),
            entry: AtomicU32::new(NOT_RESIDENT),
            extent: Some(extent),
            tier,
        }
    }

    /// The whole extent's bytes, in place.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.tier.bytes(self.extent())
    }

    /// The whole extent's bytes, writable: only before the slot is shared.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let extent = self
            .extent
            .as_mut()
            .expect("slot holds its extent until drop");
        self.tier.bytes_mut(extent)
    }

    pub(crate) fn extent_len_bytes(&self) -> u64 {
        self.extent().len_bytes()
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pins.load(Ordering::Acquire) > 0
    }

    fn extent(&self) -> &Extent {
        self.extent
            .as_ref()
            .expect("slot holds its extent until drop")
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(extent) = self.extent.take() {
            self.tier.free(extent);
        }
    }
}
