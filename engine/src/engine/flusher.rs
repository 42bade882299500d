//! Persistence: writing blocks to NVMe in batches (one data sync, one metadata commit each)
//! and committing their map entries; `flush`, which does it for every block not yet there.

use std::sync::Arc;

use mooncake_kv_tiers::Tier;

use super::Inner;
use super::verify::read_hbm_verified;
use crate::format::{self, Error as FormatError};
use crate::slot::{DramCopy, Level, NvmeCopy, Slot};
use crate::store::{BlockWrite, NVME_PAYLOAD_ALIGN};
use crate::{Error, Result, strict_assert};

/// Blocks written per batch by `flush`: one data sync and one metadata sync each.
const FLUSH_BATCH: usize = 1024;

/// Where a block being persisted is written from.
enum Source {
    /// Its DRAM copy, in place.
    Dram(Arc<DramCopy>),
    /// Its whole block, read out of HBM and verified; the payload starts at `payload_offset`.
    Host {
        block: Vec<u8>,
        payload_offset: usize,
    },
}

impl Inner {
    /// Writes blocks that are only in DRAM to NVMe and commits their map entries, with one
    /// data sync and one metadata sync for the batch. One result per slot; a slot that already
    /// has an NVMe copy is `Ok` at once.
    pub(super) fn persist(&self, slots: Vec<Arc<Slot>>) -> Vec<Result<()>> {
        let Some(store) = &self.store else {
            return slots.iter().map(|_| Err(Error::NotPersistent)).collect();
        };
        let mut results: Vec<Result<()>> = slots.iter().map(|_| Ok(())).collect();
        let mut work = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            let locations = slot.locations.read().clone();
            // Written from the DRAM copy, or from a copy read out of HBM (verified first).
            let source = match (locations.nvme, locations.dram, locations.hbm) {
                (Some(_), _, _) | (None, None, None) => continue,
                (None, Some(dram), _) => Source::Dram(dram),
                (None, None, Some(hbm)) => {
                    match self.checked(slot, read_hbm_verified(slot, &hbm)) {
                        Ok(block) => Source::Host {
                            block,
                            payload_offset: hbm.payload_offset as usize,
                        },
                        Err(error) => {
                            results[i] = Err(error);
                            continue;
                        }
                    }
                }
            };
            let len = format::encoded_len(
                slot.key.len(),
                slot.payload_len as usize,
                NVME_PAYLOAD_ALIGN,
            );
            match self.reserve(Level::Nvme, len as u64) {
                Ok(extent) => work.push((i, source, extent)),
                Err(error) => results[i] = Err(error),
            }
        }
        if work.is_empty() {
            return results;
        }
        let written = {
            let mut blocks: Vec<_> = work
                .iter_mut()
                .map(|(i, source, extent)| {
                    let slot = &slots[*i];
                    let payload = match source {
                        Source::Dram(dram) => {
                            let start = dram.payload_offset as usize;
                            &dram.bytes()[start..start + slot.payload_len as usize]
                        }
                        Source::Host {
                            block,
                            payload_offset,
                        } => &block[*payload_offset..],
                    };
                    BlockWrite {
                        extent,
                        key: &slot.key,
                        payload,
                        generation: slot.generation,
                    }
                })
                .collect();
            store.write_blocks(&mut blocks)
        };
        let entries = match written {
            Ok(entries) => entries,
            Err(error) => {
                // The store is poisoned now: the first block gets the cause, the rest say so.
                let mut error = Some(error);
                for (i, _, extent) in work {
                    results[i] = Err(error.take().unwrap_or(Error::Poisoned));
                    store.tier.free(extent);
                }
                return results;
            }
        };
        let _meta = store.meta_lock.lock();
        let mut committed = Vec::new();
        for ((i, _, extent), entry) in work.into_iter().zip(entries) {
            let slot = &slots[i];
            strict_assert!(entry.payload_crc32 == slot.payload_crc32);
            if entry.payload_crc32 != slot.payload_crc32 {
                // The DRAM copy changed under us: memory corruption. Do not persist it.
                results[i] = Err(Error::from(FormatError::PayloadChecksum {
                    expected: slot.payload_crc32,
                    actual: entry.payload_crc32,
                }));
                store.tier.free(extent);
                continue;
            }
            let current = self.index.shard(slot.hash).read().holds(slot);
            // The copy frees its extent when dropped: right away if the slot was removed or
            // overwritten meanwhile (nothing points at the extent), or on a failed commit.
            let copy = Arc::new(NvmeCopy::new(extent, Arc::clone(&store.tier), entry));
            if current {
                committed.push((i, copy));
            }
        }
        let puts: Vec<(&[u8], _)> = committed
            .iter()
            .map(|(i, copy)| (&slots[*i].key[..], copy.entry))
            .collect();
        if let Err(error) = store.commit(&puts, &[]) {
            let mut error = Some(error);
            for (i, _) in &committed {
                results[*i] = Err(error.take().unwrap_or(Error::Poisoned));
            }
            return results;
        }
        for (i, copy) in committed {
            let slot = &slots[i];
            slot.locations.write().nvme = Some(copy);
            self.account(Level::Nvme, slot, true);
            self.residency(Level::Nvme).insert(slot);
        }
        if store.tier.used_bytes() > self.config.nvme_high_watermark_bytes() {
            self.wake_reclaimer();
        }
        results
    }

    pub(super) fn flush(&self) -> Result<usize> {
        let store = self.store.as_ref().ok_or(Error::NotPersistent)?;
        store.check_poisoned()?;
        let mut pending: Vec<Arc<Slot>> = self
            .residency(Level::Dram)
            .resident()
            .into_iter()
            .filter(|s| s.nvme().is_none())
            .collect();
        // Blocks only in HBM too (persist gives each a DRAM copy to write from).
        let hbm_only = self.residency(Level::Hbm).resident();
        pending.extend(hbm_only.into_iter().filter(|s| {
            let locations = s.locations.read();
            locations.dram.is_none() && locations.nvme.is_none()
        }));
        let mut written = 0;
        for chunk in pending.chunks(FLUSH_BATCH) {
            for (slot, result) in chunk.iter().zip(self.persist(chunk.to_vec())) {
                // The operator's first question: which block.
                result.map_err(|source| Error::Flush {
                    key: crate::error::shown_key(&slot.key),
                    source: Box::new(source),
                })?;
                written += 1;
            }
        }
        // Commit pending removals even when nothing was written.
        let _meta = store.meta_lock.lock();
        store.commit(&[], &[])?;
        Ok(written)
    }
}
