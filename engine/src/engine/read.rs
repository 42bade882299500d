//! The read path: looking a key up, reading its block from the fastest tier that has it,
//! verifying it against what the index expects, and handing the payload over (into a `Vec`,
//! a caller's buffer, or device memory); a block found corrupt is dropped, never served.

use std::sync::Arc;

use mooncake_kv_tiers::{DeviceRange, ToDevice};

use super::Inner;
use super::verify::{
    check_crc, check_head, check_payload, read_hbm_verified, verify_dram, verify_nvme,
    verify_nvme_head,
};
use crate::slot::{DramCopy, HbmCopy, Level, NvmeCopy, Slot};
use crate::store::NVME_PAYLOAD_ALIGN;
use crate::{Error, Result};

/// A read finds its key's block retired under it (overwritten, say) at most this many times
/// before it reports an error instead of trying again.
const MAX_RETIRED_READS: usize = 8;

/// What reading a slot the index gave found.
#[must_use]
pub(super) enum SlotRead<T> {
    /// The block, read and verified.
    Read(T),
    /// The slot was retired after the lookup, before a copy was in hand: look the key up again.
    Retired,
}

impl<T> SlotRead<T> {
    pub(super) fn map<U>(self, f: impl FnOnce(T) -> U) -> SlotRead<U> {
        match self {
            Self::Read(value) => SlotRead::Read(f(value)),
            Self::Retired => SlotRead::Retired,
        }
    }
}

impl Inner {
    /// Looks a key up for a read, counting the use.
    pub(super) fn lookup(&self, key: &[u8]) -> Option<Arc<Slot>> {
        let Some(slot) = self.index.get(key) else {
            self.counters.tier(Level::Dram).miss();
            if self.store.is_some() {
                self.counters.tier(Level::Nvme).miss();
            }
            return None;
        };
        Some(slot)
    }

    /// Reads a block's payload and hands it to `sink`, from DRAM in place or from NVMe through
    /// a verified buffer; promotes NVMe hits when configured.
    pub(super) fn read_slot(
        &self,
        slot: &Arc<Slot>,
        sink: impl FnOnce(&[u8]),
    ) -> Result<SlotRead<()>> {
        let locations = slot.locations.read().clone();
        if let Some(dram) = &locations.dram {
            let payload = self.checked(slot, self.verify_dram(slot, dram))?;
            self.hit(Level::Dram, slot);
            if locations.hbm.is_none() {
                self.promote_to_hbm(slot, payload);
            }
            sink(payload);
            return Ok(SlotRead::Read(()));
        }
        if let Some(hbm) = &locations.hbm {
            let block = self.checked(slot, read_hbm_verified(slot, hbm))?;
            self.hit(Level::Hbm, slot);
            sink(&block[hbm.payload_offset as usize..]);
            return Ok(SlotRead::Read(()));
        }
        let Some(nvme) = &locations.nvme else {
            // Retired between the lookup and now.
            return Ok(SlotRead::Retired);
        };
        let store = self.store.as_ref().expect("an NVMe copy implies a store");
        self.counters.tier(Level::Dram).miss();
        let buf = self.checked(slot, store.read_block(nvme))?;
        let payload = self.checked(slot, verify_nvme(slot, &nvme.entry, &buf))?;
        self.hit(Level::Nvme, slot);
        if self.config.promote_on_hit {
            self.promote(slot, payload, false);
        }
        self.promote_to_hbm(slot, payload);
        sink(payload);
        Ok(SlotRead::Read(()))
    }

    pub(super) fn hit(&self, level: Level, slot: &Slot) {
        self.counters.tier(level).hit();
        self.touch(level, slot);
    }

    pub(super) fn get_into(&self, key: &[u8], target: &mut [u8]) -> Result<Option<usize>> {
        self.read_current(key, |slot| {
            let needed = slot.payload_len as usize;
            if target.len() < needed {
                return Err(Error::BufferTooSmall {
                    needed_bytes: needed,
                    available_bytes: target.len(),
                });
            }
            let locations = slot.locations.read().clone();
            if let (None, Some(hbm)) = (&locations.dram, &locations.hbm) {
                return self
                    .get_into_from_hbm(slot, hbm, target)
                    .map(SlotRead::Read);
            }
            let direct = locations.dram.is_none()
                && locations.hbm.is_none()
                && target.as_ptr() as usize % NVME_PAYLOAD_ALIGN == 0
                && target.len() >= needed.next_multiple_of(NVME_PAYLOAD_ALIGN);
            if let (true, Some(nvme)) = (direct, &locations.nvme) {
                return self.get_into_direct(slot, nvme, target).map(SlotRead::Read);
            }
            // The slot's payload length never changes, so the check above holds for the copy.
            let read = self.read_slot(slot, |payload| {
                target[..payload.len()].copy_from_slice(payload)
            })?;
            Ok(read.map(|()| needed))
        })
    }

    /// Looks `key` up and hands its slot to `read`, again while `read` finds the slot retired
    /// (removed, overwritten, or dropped from its last tier) after the lookup and before it got
    /// hold of a copy: the next lookup tells whether the key is gone or has a new block. So a
    /// read that races a writer returns the old value, the new one or a miss, never an error.
    /// A key retired under each of `MAX_RETIRED_READS` reads gets one, so no read spins.
    pub(super) fn read_current<T>(
        &self,
        key: &[u8],
        mut read: impl FnMut(&Arc<Slot>) -> Result<SlotRead<T>>,
    ) -> Result<Option<T>> {
        let mut expected_generation = 0;
        for _ in 0..MAX_RETIRED_READS {
            let Some(slot) = self.lookup(key) else {
                return Ok(None);
            };
            expected_generation = slot.generation;
            match read(&slot)? {
                SlotRead::Read(value) => return Ok(Some(value)),
                SlotRead::Retired => {}
            }
        }
        Err(Error::BlockMismatch {
            expected_generation,
            found_generation: 0,
            detail: "retired under every read",
        })
    }

    /// See [`Engine::get_into_device`].
    ///
    /// # Safety
    ///
    /// As there.
    #[expect(unsafe_code, reason = "device memory the caller names by address")]
    pub(super) unsafe fn get_into_device(
        &self,
        key: &[u8],
        target: DeviceRange,
    ) -> Result<Option<usize>> {
        let Some(hbm) = &self.hbm else {
            return Err(Error::Config {
                field: "hbm",
                reason: "get_into_device needs an HBM tier".into(),
            });
        };
        self.read_current(key, |slot| {
            let needed = slot.payload_len as usize;
            if target.len < needed as u64 {
                return Err(Error::BufferTooSmall {
                    needed_bytes: needed,
                    available_bytes: usize::try_from(target.len).unwrap_or(usize::MAX),
                });
            }
            if let Some(copy) = slot.hbm() {
                // The payload and the header in one trip; the header is checked after. The
                // extent is `copy`'s until it is dropped, so it cannot be reused meanwhile.
                let mut head = vec![0u8; copy.payload_offset as usize];
                // SAFETY: the source is this block's payload in its extent, kept alive by
                // `copy`; the target is the caller's, per the contract.
                let copied = unsafe {
                    copy.tier.copy_to_device_buffer(
                        copy.extent(),
                        u64::from(copy.payload_offset),
                        needed as u64,
                        target.ptr,
                        &mut head,
                    )
                };
                self.checked(slot, copied.map_err(Error::from))?;
                self.checked(slot, check_head(slot, &head, copy.payload_offset))?;
                self.hit(Level::Hbm, slot);
                return Ok(SlotRead::Read(needed));
            }
            let mut result = Ok(());
            let read = self.read_slot(slot, |payload| {
                // SAFETY: the target is the caller's device memory, per the contract, and at
                // least `needed` bytes long (checked above).
                result = unsafe {
                    hbm.device().copy_to_device(&[ToDevice {
                        target: target.ptr,
                        source: payload,
                    }])
                };
            })?;
            result?;
            Ok(read.map(|()| needed))
        })
    }

    /// Reads an HBM block's header and key into a small buffer and its payload straight into
    /// `target`, in one batch, checksumming the payload piece by piece as it lands (while the
    /// rest is still being copied), then verifies both.
    pub(super) fn get_into_from_hbm(
        &self,
        slot: &Arc<Slot>,
        hbm: &HbmCopy,
        target: &mut [u8],
    ) -> Result<usize> {
        let len = slot.payload_len as usize;
        let mut head = vec![0u8; hbm.payload_offset as usize];
        let mut payload_crc = crc32fast::Hasher::new();
        let read = hbm.tier.read_parts_observed(
            hbm.extent(),
            &mut [
                (0, &mut head[..]),
                (u64::from(hbm.payload_offset), &mut target[..len]),
            ],
            &mut |part, bytes| {
                if part == 1 {
                    payload_crc.update(bytes);
                }
            },
        );
        self.checked(slot, read.map_err(Error::from))?;
        self.checked(slot, check_head(slot, &head, hbm.payload_offset))?;
        self.checked(slot, check_crc(payload_crc.finalize(), slot.payload_crc32))?;
        self.hit(Level::Hbm, slot);
        Ok(len)
    }

    /// Reads an NVMe-only block's header sectors into a small buffer and its payload straight
    /// into `target`, in one batch, then verifies both.
    pub(super) fn get_into_direct(
        &self,
        slot: &Arc<Slot>,
        nvme: &NvmeCopy,
        target: &mut [u8],
    ) -> Result<usize> {
        let store = self.store.as_ref().expect("an NVMe copy implies a store");
        self.counters.tier(Level::Dram).miss();
        let entry = nvme.entry;
        let payload_len = entry.payload_len as usize;
        let mut head = mooncake_kv_tiers::AlignedBuf::zeroed(entry.payload_offset as usize);
        let payload_span = payload_len.next_multiple_of(NVME_PAYLOAD_ALIGN);
        let mut reads = vec![(nvme.extent(), 0, &mut head[..])];
        if payload_span > 0 {
            reads.push((
                nvme.extent(),
                u64::from(entry.payload_offset),
                &mut target[..payload_span],
            ));
        }
        for result in store.tier.read_extents(&mut reads) {
            self.checked(slot, result.map_err(Error::from))?;
        }
        self.checked(slot, verify_nvme_head(slot, &entry, &head))?;
        self.checked(
            slot,
            check_payload(&target[..payload_len], entry.payload_crc32),
        )?;
        self.hit(Level::Nvme, slot);
        if self.config.promote_on_hit {
            self.promote(slot, &target[..payload_len], false);
        }
        Ok(payload_len)
    }

    /// Passes a result through; on a verification failure, reports the block, counts it and
    /// drops it (index and map), so it is never served.
    pub(super) fn checked<T>(&self, slot: &Arc<Slot>, result: Result<T>) -> Result<T> {
        let error = match result {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let corrupt = !matches!(error, Error::Tier(mooncake_kv_tiers::Error::Io { .. }));
        if corrupt {
            tracing::error!(%error, generation = slot.generation, key = ?String::from_utf8_lossy(&slot.key), "corrupt block; dropping it");
            self.counters.corrupt_block();
            let removed =
                self.index
                    .shard(slot.hash)
                    .write()
                    .remove_if(slot.hash, &slot.key, |s| Arc::ptr_eq(s, slot));
            if let Some(removed) = removed {
                self.forget_residency(&removed);
                self.retire(removed);
            }
        }
        Err(error)
    }

    /// Checks a DRAM copy against what the slot says it holds and returns the payload in
    /// place (its CRC too when configured: it was checked as the block was written).
    pub(super) fn verify_dram<'a>(&self, slot: &Slot, copy: &'a DramCopy) -> Result<&'a [u8]> {
        let check_payload_crc =
            self.config.verify_payload_on_dram_read || cfg!(feature = "strict-assertions");
        verify_dram(slot, copy.bytes(), copy.payload_offset, check_payload_crc)
    }
}
