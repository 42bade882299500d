//! The write path: reserving DRAM for a block and committing it (two-phase puts), encoding
//! puts straight into HBM or DRAM, publishing a block in the index (puts of one key take
//! effect in generation order), and retiring the block a put or a removal replaces.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use mooncake_kv_tiers::{Extent, ExtentParts, Tier};

use super::{DRAM_PAYLOAD_ALIGN, Inner};
use crate::format;
use crate::slot::{DramCopy, HbmCopy, Level, Lineage, Locations, Slot, dram_extent_len};
use crate::{Error, Result, strict_assert};

/// DRAM space reserved for one block by [`Engine::reserve`](crate::Engine::reserve), not yet visible to readers.
/// Dropping it returns the space; [`Engine::commit`](crate::Engine::commit) makes it a block.
pub struct Reservation {
    key: Box<[u8]>,
    payload_len: u32,
    copy: DramCopy,
}

impl Reservation {
    /// The key the block will have.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Bytes of the payload.
    pub fn payload_len(&self) -> usize {
        self.payload_len as usize
    }

    /// Where the payload goes in the shared DRAM region, for a peer that writes it there.
    pub fn payload_region_offset(&self) -> u64 {
        self.copy.offset_bytes() + u64::from(self.copy.payload_offset)
    }

    /// The payload's space, to fill locally.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.copy.payload_offset as usize;
        let len = self.payload_len as usize;
        &mut self.copy.bytes_mut()[start..start + len]
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("key_len", &self.key.len())
            .field("payload_len", &self.payload_len)
            .field("payload_region_offset", &self.payload_region_offset())
            .finish()
    }
}

impl Inner {
    pub(super) fn reserve_block(&self, key: &[u8], payload_len: usize) -> Result<Reservation> {
        format::check_key(key)?;
        if payload_len > format::MAX_VALUE_BYTES {
            return Err(format::Error::ValueTooLarge {
                len_bytes: payload_len,
                max_bytes: format::MAX_VALUE_BYTES,
            }
            .into());
        }
        let block_len = format::encoded_len(key.len(), payload_len, DRAM_PAYLOAD_ALIGN);
        let extent = self.reserve(Level::Dram, dram_extent_len(block_len, payload_len))?;
        let payload_offset = format::payload_offset(key.len(), DRAM_PAYLOAD_ALIGN);
        let mut copy = DramCopy::new(
            extent,
            Arc::clone(&self.dram),
            payload_offset as u32,
            payload_len,
        );
        // Whatever block lay here before must not be taken for itself by a reader holding a
        // stale descriptor while the new payload is written over it.
        copy.bytes_mut()[..format::HEADER_BYTES].fill(0);
        Ok(Reservation {
            key: key.into(),
            payload_len: payload_len as u32,
            copy,
        })
    }

    pub(super) fn commit(&self, reservation: Reservation, lineage: Lineage) -> Result<Arc<Slot>> {
        let Reservation {
            key,
            payload_len,
            mut copy,
        } = reservation;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let block_len = format::seal_in_place(
            copy.bytes_mut(),
            &key,
            payload_len as usize,
            generation,
            DRAM_PAYLOAD_ALIGN,
        )?;
        self.publish_written(&key, generation, copy, block_len, lineage)
    }

    /// Makes a block written into `copy` (sealed, `block_len` bytes) the key's block.
    pub(super) fn publish_written(
        &self,
        key: &[u8],
        generation: u64,
        copy: DramCopy,
        block_len: usize,
        lineage: Lineage,
    ) -> Result<Arc<Slot>> {
        strict_assert!(format::decode(&copy.bytes()[..block_len]).is_ok());
        let header = format::decode_header(copy.bytes())?;
        let locations = Locations {
            dram: Some(Arc::new(copy)),
            ..Locations::default()
        };
        Ok(self.publish_new(key, generation, &header, locations, lineage))
    }

    /// Makes a new block, whose one copy is in `locations`, the key's block, and counts the
    /// put.
    pub(super) fn publish_new(
        &self,
        key: &[u8],
        generation: u64,
        header: &format::Header,
        locations: Locations,
        lineage: Lineage,
    ) -> Arc<Slot> {
        let slot = Arc::new(Slot::new(
            key,
            self.index.hash(key),
            generation,
            header.payload_len,
            header.payload_crc32,
            locations,
            lineage,
        ));
        self.publish(&slot);
        self.counters.put();
        slot
    }

    /// The part of an HBM block before its payload (header, key, padding), made on the host;
    /// the value goes to the device as it is, checksummed where it lies.
    pub(super) fn hbm_head(key: &[u8], value: &[u8], generation: u64) -> Result<Vec<u8>> {
        let mut head = vec![0u8; format::payload_offset(key.len(), DRAM_PAYLOAD_ALIGN)];
        format::encode_head(&mut head, key, value, generation, DRAM_PAYLOAD_ALIGN)?;
        Ok(head)
    }

    /// HBM for a block, making room there as [`reserve`](Self::reserve) does; `None` without
    /// an HBM tier or when the block cannot fit there (it goes to DRAM then).
    fn reserve_hbm(&self, len_bytes: u64) -> Option<Extent> {
        self.hbm.as_ref()?;
        self.reserve(Level::Hbm, len_bytes).ok()
    }

    pub(super) fn put_one(&self, key: &[u8], value: &[u8], lineage: Lineage) -> Result<Arc<Slot>> {
        format::check_key(key)?;
        format::check_value(value)?;
        let block_len = format::encoded_len(key.len(), value.len(), DRAM_PAYLOAD_ALIGN);
        if let Some(extent) = self.reserve_hbm(block_len as u64) {
            return self.put_into_hbm(extent, key, value, block_len, lineage);
        }
        // No HBM tier, or it cannot take the block (larger than the tier, nothing to demote):
        // DRAM.
        let extent = self.reserve(Level::Dram, dram_extent_len(block_len, value.len()))?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let payload_offset = format::payload_offset(key.len(), DRAM_PAYLOAD_ALIGN);
        // The offset fits in u32: it is at most MAX_PAYLOAD_OFFSET.
        let mut copy = DramCopy::new(
            extent,
            Arc::clone(&self.dram),
            payload_offset as u32,
            value.len(),
        );
        // If encoding failed, dropping the copy would return the extent.
        let written =
            format::encode_into(copy.bytes_mut(), key, value, generation, DRAM_PAYLOAD_ALIGN)?;
        strict_assert!(written == block_len);
        self.publish_written(key, generation, copy, block_len, lineage)
    }

    /// Writes a block into an HBM extent (encoded on the host, one copy to the device) and
    /// publishes it.
    pub(super) fn put_into_hbm(
        &self,
        extent: Extent,
        key: &[u8],
        value: &[u8],
        block_len: usize,
        lineage: Lineage,
    ) -> Result<Arc<Slot>> {
        let hbm = self.hbm.as_ref().expect("an HBM extent implies the tier");
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // The copy owns the extent from here, so any failure below returns it.
        let payload_offset = format::payload_offset(key.len(), DRAM_PAYLOAD_ALIGN);
        let mut copy = HbmCopy::new(
            extent,
            Arc::clone(hbm),
            payload_offset as u32,
            block_len as u32,
        );
        // Head and value in one batch of copies, no intermediate buffer.
        let head = Self::hbm_head(key, value, generation)?;
        hbm.write_parts(
            copy.extent_mut(),
            &[(0, &head[..]), (payload_offset as u64, value)],
        )?;
        let header = format::decode_header(&head)?;
        let locations = Locations {
            hbm: Some(Arc::new(copy)),
            ..Locations::default()
        };
        Ok(self.publish_new(key, generation, &header, locations, lineage))
    }

    /// Puts many blocks into HBM with one trip to the device: every extent is reserved and
    /// every header made first, then all the copies go in one batch, then the blocks are
    /// published. An item HBM cannot take goes to DRAM on its own.
    pub(super) fn put_batch_hbm(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<u64>> {
        let hbm = self.hbm.as_ref().expect("called with an HBM tier");
        let mut results: Vec<Option<Result<u64>>> = Vec::with_capacity(items.len());
        // Per staged block: (item, generation, block length), its extent, its head.
        let mut staged = Vec::new();
        let mut extents = Vec::new();
        let mut heads = Vec::new();
        for (i, &(key, value)) in items.iter().enumerate() {
            let checked = format::check_key(key).and_then(|()| format::check_value(value));
            if let Err(error) = checked {
                results.push(Some(Err(error.into())));
                continue;
            }
            let block_len = format::encoded_len(key.len(), value.len(), DRAM_PAYLOAD_ALIGN);
            let Some(extent) = self.reserve_hbm(block_len as u64) else {
                results.push(Some(
                    self.put_one(key, value, Lineage::default())
                        .map(|slot| slot.generation),
                ));
                continue;
            };
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            match Self::hbm_head(key, value, generation) {
                Ok(head) => {
                    results.push(None);
                    staged.push((i, generation, block_len));
                    extents.push(extent);
                    heads.push(head);
                }
                Err(error) => {
                    hbm.free(extent);
                    results.push(Some(Err(error)));
                }
            }
        }
        let parts: Vec<[(u64, &[u8]); 2]> = staged
            .iter()
            .zip(&heads)
            .map(|(&(i, _, _), head)| [(0, &head[..]), (head.len() as u64, items[i].1)])
            .collect();
        let written = {
            let mut batch: Vec<ExtentParts<'_>> = extents
                .iter_mut()
                .zip(&parts)
                .map(|(extent, parts)| (extent, &parts[..]))
                .collect();
            hbm.write_many(&mut batch)
        };
        drop(parts);
        for (((i, generation, block_len), extent), head) in
            staged.into_iter().zip(extents).zip(heads)
        {
            let copy = HbmCopy::new(extent, Arc::clone(hbm), head.len() as u32, block_len as u32);
            let outcome = match (&written, format::decode_header(&head)) {
                (Err(error), _) => Err(Error::Tier(mooncake_kv_tiers::Error::Device {
                    device: hbm.device().name(),
                    action: "copy a batch of blocks",
                    reason: error.to_string(),
                })),
                (Ok(()), Err(error)) => Err(error.into()),
                (Ok(()), Ok(header)) => {
                    let locations = Locations {
                        hbm: Some(Arc::new(copy)),
                        ..Locations::default()
                    };
                    self.publish_new(
                        items[i].0,
                        generation,
                        &header,
                        locations,
                        Lineage::default(),
                    );
                    Ok(generation)
                }
            };
            results[i] = Some(outcome);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Poisoned)))
            .collect()
    }

    /// Makes a written slot visible. If a concurrent put of the same key already published a
    /// later generation, that one stays and this one is dropped: puts of one key take effect
    /// in generation order.
    pub(super) fn publish(&self, slot: &Arc<Slot>) {
        let mut shard = self.index.shard(slot.hash).write();
        if shard
            .find(slot.hash, &slot.key)
            .is_some_and(|c| c.generation > slot.generation)
        {
            return;
        }
        let replaced = shard.insert(Arc::clone(slot));
        if let Some(old) = &replaced {
            self.forget_residency(old);
        }
        // A new block has one copy: in HBM when it went there, else in DRAM.
        let level = if slot.locations.read().hbm.is_some() {
            Level::Hbm
        } else {
            Level::Dram
        };
        self.residency(level).insert(slot);
        drop(shard);
        self.account(level, slot, true);
        if let Some(old) = replaced {
            self.retire(old);
        }
    }

    /// A slot that left the index (removed, overwritten, evicted, found corrupt): its copies'
    /// counts go, and its map entry, if it has one, is deleted at the next commit.
    pub(super) fn retire(&self, slot: Arc<Slot>) {
        let locations = {
            // Under meta_lock: a persist in progress has either committed and set the NVMe
            // copy (so we see it and delete its entry) or will find the slot gone from the index.
            let _meta = self.store.as_ref().map(|s| s.meta_lock.lock());
            std::mem::take(&mut *slot.locations.write())
        };
        if locations.dram.is_some() {
            self.account(Level::Dram, &slot, false);
        }
        if locations.hbm.is_some() {
            self.account(Level::Hbm, &slot, false);
        }
        if let Some(nvme) = locations.nvme {
            self.account(Level::Nvme, &slot, false);
            if let Some(store) = &self.store {
                store.defer_delete(&slot.key, nvme);
            }
        }
    }

    pub(super) fn remove_if(&self, key: &[u8], generation: Option<u64>) -> bool {
        let hash = self.index.hash(key);
        let removed = self.index.shard(hash).write().remove_if(hash, key, |slot| {
            generation.is_none_or(|g| slot.generation == g)
        });
        let Some(slot) = removed else { return false };
        self.forget_residency(&slot);
        self.retire(slot);
        self.counters.remove();
        true
    }
}
