//! Moving blocks up the tiers: a hit on NVMe copies the block into DRAM, a hit below HBM
//! into HBM, when there is room (promotion never evicts); a pin or a demotion gives a block
//! that is only in HBM a DRAM copy.

use std::sync::Arc;

use mooncake_kv_tiers::Tier;

use super::verify::read_hbm_verified;
use super::{DRAM_PAYLOAD_ALIGN, Inner};
use crate::format;
use crate::slot::{DramCopy, HbmCopy, Level, Slot, dram_extent_len};

impl Inner {
    /// Copies an NVMe block into DRAM. A read hit promotes only into free space below the
    /// high watermark (`make_room` false: promotion never evicts); a pin makes room.
    pub(super) fn promote(&self, slot: &Arc<Slot>, payload: &[u8], make_room: bool) -> bool {
        let len = dram_extent_len(
            format::encoded_len(slot.key.len(), payload.len(), DRAM_PAYLOAD_ALIGN),
            payload.len(),
        );
        let extent = if make_room {
            match self.reserve(Level::Dram, len) {
                Ok(extent) => extent,
                Err(_) => return false,
            }
        } else {
            if self.dram.used_bytes() + len > self.config.high_watermark_bytes() {
                // No room below the high mark: the reclaimer brings DRAM down to its low mark
                // (demoting the coldest blocks, not this hot one), so later hits find room.
                self.want_room();
                return false;
            }
            let Ok(extent) = self.dram.allocate(len) else {
                return false;
            };
            extent
        };
        let offset = format::payload_offset(slot.key.len(), DRAM_PAYLOAD_ALIGN);
        let mut copy = DramCopy::new(extent, Arc::clone(&self.dram), offset as u32, payload.len());
        if format::encode_into(
            copy.bytes_mut(),
            &slot.key,
            payload,
            slot.generation,
            DRAM_PAYLOAD_ALIGN,
        )
        .is_err()
        {
            return false;
        }
        let shard = self.index.shard(slot.hash).read();
        if !shard.holds(slot) {
            return false;
        }
        let mut locations = slot.locations.write();
        // Nothing to do if it is in DRAM already, or gone (no copy anywhere).
        if locations.dram.is_some() || (locations.nvme.is_none() && locations.hbm.is_none()) {
            return false;
        }
        locations.dram = Some(Arc::new(copy));
        self.account(Level::Dram, slot, true);
        self.residency(Level::Dram).insert(slot);
        if locations.hbm.is_none() {
            self.counters.promotion();
        }
        true
    }

    /// Copies a block read from DRAM or NVMe into HBM when the tier promotes on hits and has
    /// room below its high watermark (promotion never demotes).
    pub(super) fn promote_to_hbm(&self, slot: &Arc<Slot>, payload: &[u8]) {
        let (Some(hbm), Some(settings)) = (&self.hbm, &self.config.hbm) else {
            return;
        };
        if !settings.promote_on_hit || slot.locations.read().hbm.is_some() {
            return;
        }
        let len = format::encoded_len(slot.key.len(), payload.len(), DRAM_PAYLOAD_ALIGN);
        if hbm.used_bytes() + len as u64 > self.config.hbm_watermark_bytes().0 {
            return;
        }
        let Ok(mut extent) = hbm.allocate(len as u64) else {
            return;
        };
        let mut block = vec![0u8; len];
        if format::encode_into(
            &mut block,
            &slot.key,
            payload,
            slot.generation,
            DRAM_PAYLOAD_ALIGN,
        )
        .is_err()
            || hbm.write_at(&mut extent, 0, &block).is_err()
        {
            hbm.free(extent);
            return;
        }
        let offset = format::payload_offset(slot.key.len(), DRAM_PAYLOAD_ALIGN) as u32;
        let copy = Arc::new(HbmCopy::new(extent, Arc::clone(hbm), offset, len as u32));
        let shard = self.index.shard(slot.hash).read();
        if !shard.holds(slot) {
            return;
        }
        let mut locations = slot.locations.write();
        if locations.hbm.is_some() || (locations.dram.is_none() && locations.nvme.is_none()) {
            return;
        }
        locations.hbm = Some(copy);
        self.account(Level::Hbm, slot, true);
        self.residency(Level::Hbm).insert(slot);
        self.counters.promotion();
    }

    /// Gives a block that is only in HBM a DRAM copy (making room there), so it can be pinned,
    /// persisted or demoted. Whether a copy was made.
    pub(super) fn copy_down(&self, slot: &Arc<Slot>) -> bool {
        let copy = {
            let locations = slot.locations.read();
            if locations.dram.is_some() || locations.nvme.is_some() {
                return false;
            }
            let Some(copy) = locations.hbm.clone() else {
                return false;
            };
            copy
        };
        match read_hbm_verified(slot, &copy) {
            Ok(block) => self.promote(slot, &block[copy.payload_offset as usize..], true),
            Err(error) => {
                tracing::error!(%error, "a block read out of HBM failed or did not verify");
                false
            }
        }
    }
}
