//! Recovery: at open, every block the data directory's map holds is served again, from NVMe,
//! and generations go on from the largest one found.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::Result;
use crate::slot::{Level, Lineage, Locations, Slot};

impl Inner {
    pub(super) fn recover(&self) -> Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut max_generation = 0;
        let mut slots = Vec::new();
        store.recover(
            |key, copy| {
                max_generation = max_generation.max(copy.entry.generation);
                let slot = Arc::new(Slot::new(
                    key,
                    self.index.hash(key),
                    copy.entry.generation,
                    copy.entry.payload_len,
                    copy.entry.payload_crc32,
                    Locations { dram: None, nvme: Some(copy), hbm: None },
                    // Links are not persisted: after a restart every block starts unlinked.
                    Lineage::default(),
                ));
                slots.push(slot);
            },
            |key, error| {
                self.counters.corrupt_block();
                tracing::error!(%error, key = ?String::from_utf8_lossy(key), "dropping a bad map entry");
            },
        )?;
        for slot in &slots {
            self.index.shard(slot.hash).write().insert(Arc::clone(slot));
            self.account(Level::Nvme, slot, true);
        }
        let mut residency = self.residency(Level::Nvme);
        for slot in &slots {
            residency.insert(slot);
        }
        self.next_generation
            .store(max_generation + 1, Ordering::Relaxed);
        self.first_new_generation
            .store(max_generation + 1, Ordering::Relaxed);
        Ok(())
    }
}
