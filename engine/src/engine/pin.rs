//! Pins: a block held in DRAM, neither evicted nor moved, while a caller reads it in place
//! ([`PinnedBlock`]); and the copy-less hold a chain keeps on its previous block.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mooncake_kv_tiers::Tier;

use super::verify::verify_nvme;
use super::{DRAM_PAYLOAD_ALIGN, Inner};
use crate::format;
use crate::slot::{DramCopy, Level, Slot, dram_extent_len};
use crate::{Error, Result};

/// A block pinned in place in DRAM: it will not be evicted or moved until this guard drops,
/// and its payload can be read without a copy.
///
/// Pins are for short reads (copying a block to a GPU or a socket). A pinned block still
/// counts against capacity, and a put that needs its space gets [`Error::NoSpace`] rather
/// than waiting.
pub struct PinnedBlock {
    slot: Arc<Slot>,
    copy: Arc<DramCopy>,
}

impl PinnedBlock {
    /// The key.
    pub fn key(&self) -> &[u8] {
        &self.slot.key
    }

    /// The generation the block was written with.
    pub fn generation(&self) -> u64 {
        self.slot.generation
    }

    /// Where the block (header first, in the block format) starts in the DRAM region: what a
    /// node hands a peer that reads it one-sidedly from the registered region.
    pub fn block_offset(&self) -> u64 {
        self.copy.offset_bytes()
    }

    /// Bytes of the whole block in DRAM: header, key, padding, payload.
    pub fn block_len(&self) -> u64 {
        u64::from(self.copy.payload_offset) + u64::from(self.slot.payload_len)
    }

    /// The whole block in place in the DRAM tier (header, key, padding, payload): what a node
    /// sends a peer.
    pub fn block_bytes(&self) -> &[u8] {
        let len = self.copy.payload_offset as usize + self.slot.payload_len as usize;
        &self.copy.bytes()[..len]
    }

    /// Offset of the payload from the start of the block.
    pub fn payload_offset(&self) -> u32 {
        self.copy.payload_offset
    }

    /// The payload, in place in the DRAM tier.
    pub fn payload(&self) -> &[u8] {
        let start = self.copy.payload_offset as usize;
        &self.copy.bytes()[start..start + self.slot.payload_len as usize]
    }
}

/// A pin without a copy: keeps a block from being evicted or moved for a moment.
pub(super) struct Held(pub(super) Arc<Slot>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        self.slot.pins.fetch_sub(1, Ordering::Release);
    }
}

impl fmt::Debug for PinnedBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedBlock")
            .field("key_len", &self.slot.key.len())
            .field("generation", &self.slot.generation)
            .field("payload_len", &self.slot.payload_len)
            .finish()
    }
}

impl Inner {
    /// Pins `slot` where it is (under its shard's read lock, as [`pin`](Self::pin) does).
    pub(super) fn hold(&self, slot: Arc<Slot>) -> Held {
        let _shard = self.index.shard(slot.hash).read();
        slot.pins.fetch_add(1, Ordering::AcqRel);
        Held(slot)
    }

    pub(super) fn pin(&self, key: &[u8]) -> Result<Option<PinnedBlock>> {
        // Bytes the block needs in DRAM, for the error if it never gets there.
        let mut needed_bytes = 0;
        for _ in 0..3 {
            let hash = self.index.hash(key);
            let pinned = {
                let shard = self.index.shard(hash).read();
                let Some(slot) = shard.find(hash, key) else {
                    drop(shard);
                    self.counters.tier(Level::Dram).miss();
                    return Ok(None);
                };
                // Under the shard's read lock, so a mover (which checks pins under the write
                // lock) either ran before and the copy is gone, or runs after and sees the pin.
                let dram = slot.dram();
                dram.map(|copy| {
                    slot.pins.fetch_add(1, Ordering::AcqRel);
                    PinnedBlock {
                        slot: Arc::clone(slot),
                        copy,
                    }
                })
            };
            match pinned {
                Some(pinned) => {
                    self.checked(&pinned.slot, self.verify_dram(&pinned.slot, &pinned.copy))?;
                    self.hit(Level::Dram, &pinned.slot);
                    return Ok(Some(pinned));
                }
                None => {
                    // Only in HBM or on NVMe: bring it into DRAM, making room if needed, then
                    // pin.
                    let Some(slot) = self.index.get(key) else {
                        return Ok(None);
                    };
                    if let Some(hbm) = slot.hbm() {
                        needed_bytes = u64::from(hbm.block_len);
                        self.copy_down(&slot);
                        continue;
                    }
                    let Some(nvme) = slot.nvme() else { continue };
                    let store = self.store.as_ref().expect("an NVMe copy implies a store");
                    let buf = self.checked(&slot, store.read_block(&nvme))?;
                    let payload = self.checked(&slot, verify_nvme(&slot, &nvme.entry, &buf))?;
                    needed_bytes = dram_extent_len(
                        format::encoded_len(slot.key.len(), payload.len(), DRAM_PAYLOAD_ALIGN),
                        payload.len(),
                    );
                    self.promote(&slot, payload, true);
                }
            }
        }
        Err(Error::NoSpace {
            required_bytes: needed_bytes,
            capacity_bytes: self.dram.capacity_bytes(),
            used_bytes: self.dram.used_bytes(),
            pinned_bytes: self.pinned_bytes(Level::Dram),
        })
    }
}
