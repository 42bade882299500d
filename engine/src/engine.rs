//! The engine: index, residency (eviction order), leases and the public API.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mooncake_kv_tiers::{DramConfig, DramTier, HugePageMode, Tier, TierKind};
use parking_lot::Mutex;

use crate::eviction::{EntryId, EvictionPolicy, new_policy};
use crate::format::{self, HEADER_BYTES};
use crate::index::Index;
use crate::slot::{NOT_RESIDENT, Slot};
use crate::{EngineConfig, Error, Result, strict_assert};

/// Payloads in DRAM start on a cache line, so copies out of the tier run at full speed.
const DRAM_PAYLOAD_ALIGN: usize = 64;
/// Victims taken from the policy per lock acquisition.
const EVICTION_BATCH: usize = 32;

/// An embeddable, thread-safe KVCache block store.
///
/// Share it between threads with `Arc<Engine>`; every method takes `&self`.
pub struct Engine {
    config: EngineConfig,
    dram: Arc<DramTier>,
    index: Index,
    residency: Mutex<Residency>,
    next_generation: AtomicU64,
    /// Set while one thread brings usage back under the low watermark, so that others do not
    /// evict on top of it.
    reclaiming: AtomicBool,
    counters: Counters,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<PinnedBlock>();
};

#[derive(Debug, Default)]
struct Counters {
    blocks: AtomicU64,
    payload_bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    puts: AtomicU64,
    removes: AtomicU64,
}

/// Figures for one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierStats {
    /// The medium.
    pub kind: TierKind,
    /// Bytes the tier manages.
    pub capacity_bytes: u64,
    /// Bytes in allocated extents (blocks, their headers and rounding, and blocks evicted
    /// but still being read).
    pub used_bytes: u64,
    /// The largest block that fits now without evicting.
    pub largest_free_bytes: u64,
    /// Separate free extents: many, small ones mean fragmentation.
    pub free_extents: u64,
    /// Blocks in the index.
    pub blocks: u64,
    /// Payload bytes of those blocks.
    pub payload_bytes: u64,
    /// Reads (get, get_into, pin) that found their block here.
    pub hits: u64,
    /// Reads that did not find their block here.
    pub misses: u64,
    /// Blocks evicted to make room.
    pub evictions: u64,
    /// What pages the DRAM region got.
    pub huge_pages: HugePageMode,
}

/// Figures for the whole engine, from [`Engine::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// One entry per tier, fastest first.
    pub tiers: Vec<TierStats>,
    /// Successful puts.
    pub puts: u64,
    /// Blocks removed by `remove`.
    pub removes: u64,
}

/// A block pinned in place: it will not be evicted or moved until this guard drops, and its
/// payload can be read without a copy.
///
/// Pins are for short reads (copying a block to a GPU or a socket). A pinned block still
/// counts against capacity, and a put that needs its space gets [`Error::NoSpace`] rather
/// than waiting.
pub struct PinnedBlock {
    slot: Arc<Slot>,
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

    /// The payload, in place in the DRAM tier.
    pub fn payload(&self) -> &[u8] {
        let start = self.slot.payload_offset as usize;
        &self.slot.bytes()[start..start + self.slot.payload_len as usize]
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

/// The eviction policy and the table that maps its entry ids back to slots.
#[derive(Debug)]
struct Residency {
    policy: Box<dyn EvictionPolicy>,
    /// Indexed by entry id. The generation sits beside the slot so that checking an id
    /// against a generation reads this array only.
    slots: Vec<(u64, Option<Arc<Slot>>)>,
    free_ids: Vec<EntryId>,
}

impl Residency {
    fn insert(&mut self, slot: &Arc<Slot>) {
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                let id = EntryId::try_from(self.slots.len())
                    .ok()
                    .filter(|&id| id != NOT_RESIDENT)
                    .expect("more resident blocks than entry ids");
                self.slots.push((0, None));
                id
            }
        };
        debug_assert!(self.slots[id as usize].1.is_none());
        self.slots[id as usize] = (slot.generation, Some(Arc::clone(slot)));
        slot.entry.store(id, Ordering::Relaxed);
        self.policy.insert(id);
    }

    /// Whether `id` currently holds the slot of `generation` (generations are unique, so this
    /// tells a slot from whatever reused its id).
    fn holds(&self, id: EntryId, generation: u64) -> bool {
        // Generations start at 1, so the 0 of a free id never matches.
        self.slots
            .get(id as usize)
            .is_some_and(|&(g, _)| g == generation)
    }

    fn remove(&mut self, slot: &Slot) {
        let id = slot.entry.load(Ordering::Relaxed);
        if self.holds(id, slot.generation) {
            self.policy.remove(id);
            self.release(id);
        }
    }

    fn touch(&mut self, id: EntryId, generation: u64) {
        if self.holds(id, generation) {
            self.policy.access(id);
        }
    }

    fn pop_victim(&mut self) -> Option<Arc<Slot>> {
        let id = self.policy.pop_victim()?;
        Some(self.release(id))
    }

    fn release(&mut self, id: EntryId) -> Arc<Slot> {
        let (_, slot) = std::mem::take(&mut self.slots[id as usize]);
        let slot = slot.expect("policy tracks only resident ids");
        slot.entry.store(NOT_RESIDENT, Ordering::Relaxed);
        self.free_ids.push(id);
        slot
    }

    fn pinned_bytes(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(|(_, slot)| slot.as_ref())
            .filter(|s| s.is_pinned())
            .map(|s| s.extent_len_bytes())
            .sum()
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens an engine: validates the config and maps the DRAM tier.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first invalid field; [`Error::Tier`] if the DRAM region
    /// cannot be created.
    pub fn open(config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let dram = DramTier::open(DramConfig {
            capacity_bytes: config.dram_capacity_bytes,
            huge_pages: config.dram_huge_pages,
            populate: config.dram_populate,
            ..DramConfig::default()
        })?;
        Ok(Self {
            index: Index::new(config.index_shards),
            residency: Mutex::new(Residency {
                policy: new_policy(config.eviction_policy),
                slots: Vec::new(),
                free_ids: Vec::new(),
            }),
            dram: Arc::new(dram),
            next_generation: AtomicU64::new(1),
            reclaiming: AtomicBool::new(false),
            counters: Counters::default(),
            config,
        })
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The DRAM tier, for registering its region with a transfer engine.
    pub fn dram(&self) -> &DramTier {
        &self.dram
    }

    /// Stores `value` under `key`, replacing any block the key had, and returns the new
    /// block's generation (greater than that of any block put before it).
    ///
    /// The value is copied once, straight into the tier, and checksummed in the same pass.
    /// If the tier is full, the coldest unpinned blocks are evicted to make room.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyKey`], [`Error::KeyTooLong`], [`Error::ValueTooLarge`]; [`Error::NoSpace`]
    /// if the block does not fit even after evicting every block that may be evicted.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<u64> {
        let generation = self.put_one(key, value)?;
        self.reclaim_above_high_watermark();
        Ok(generation)
    }

    /// [`put`](Self::put) for many blocks; one result per item, in order. A failed item does
    /// not stop the others.
    pub fn put_batch(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<u64>> {
        let results = items
            .iter()
            .map(|(key, value)| self.put_one(key, value))
            .collect();
        self.reclaim_above_high_watermark();
        results
    }

    /// Copies the value of `key` into a new `Vec`. `Ok(None)` is a miss.
    ///
    /// # Errors
    ///
    /// A corruption error ([`Error::HeaderChecksum`], [`Error::BlockMismatch`], ...) if the
    /// block in the tier fails verification; the block is then dropped from the index.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(slot) = self.lookup_for_read(key) else {
            return Ok(None);
        };
        let payload = self.verified_payload(&slot)?;
        Ok(Some(payload.to_vec()))
    }

    /// [`get`](Self::get) for many keys; one result per key, in order.
    pub fn get_batch(&self, keys: &[&[u8]]) -> Vec<Result<Option<Vec<u8>>>> {
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// Copies the value of `key` into the start of `target` and returns its length. Exactly
    /// one copy: from the tier into `target`. The header is verified first. `Ok(None)` is a
    /// miss and leaves `target` untouched.
    ///
    /// # Errors
    ///
    /// [`Error::BufferTooSmall`] if `target` is shorter than the value; the errors of
    /// [`get`](Self::get).
    pub fn get_into(&self, key: &[u8], target: &mut [u8]) -> Result<Option<usize>> {
        let Some(slot) = self.lookup_for_read(key) else {
            return Ok(None);
        };
        let payload = self.verified_payload(&slot)?;
        let Some(target) = target.get_mut(..payload.len()) else {
            return Err(Error::BufferTooSmall {
                needed_bytes: payload.len(),
                available_bytes: target.len(),
            });
        };
        target.copy_from_slice(payload);
        Ok(Some(payload.len()))
    }

    /// [`get_into`](Self::get_into) for many keys, each with its own target buffer.
    pub fn get_into_batch(&self, items: &mut [(&[u8], &mut [u8])]) -> Vec<Result<Option<usize>>> {
        items
            .iter_mut()
            .map(|(key, target)| self.get_into(key, target))
            .collect()
    }

    /// Pins the block of `key` in place and returns a guard that reads its payload without a
    /// copy. The block is neither evicted nor moved while the guard lives. `Ok(None)` is a miss.
    ///
    /// # Errors
    ///
    /// The errors of [`get`](Self::get).
    pub fn pin(&self, key: &[u8]) -> Result<Option<PinnedBlock>> {
        let slot = {
            let hash = self.index.hash(key);
            let shard = self.index.shard(hash).read();
            let Some(slot) = shard.find(hash, key) else {
                drop(shard);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            };
            // Under the shard's read lock, so eviction (which checks pins under the write
            // lock) either ran before and the block is gone, or runs after and sees the pin.
            slot.pins.fetch_add(1, Ordering::AcqRel);
            Arc::clone(slot)
        };
        let pinned = PinnedBlock { slot };
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.touch(&pinned.slot);
        self.verified_payload(&pinned.slot)?;
        Ok(Some(pinned))
    }

    /// Whether `key` has a block. Does not count as a use for eviction.
    pub fn exists(&self, key: &[u8]) -> bool {
        self.index.contains(key)
    }

    /// [`exists`](Self::exists) for many keys, in order.
    pub fn exists_batch(&self, keys: &[&[u8]]) -> Vec<bool> {
        keys.iter().map(|key| self.exists(key)).collect()
    }

    /// How many leading keys of a chain have blocks: the length of the cached prefix. Stops at
    /// the first key without one. The blocks of the matched prefix count as used, since a
    /// scheduler asks this just before it reads them.
    pub fn prefix_match(&self, keys: &[&[u8]]) -> usize {
        let mut matched: Vec<(EntryId, u64)> = Vec::with_capacity(keys.len());
        for key in keys {
            let hash = self.index.hash(key);
            let shard = self.index.shard(hash).read();
            let Some(slot) = shard.find(hash, key) else {
                break;
            };
            matched.push((slot.entry.load(Ordering::Relaxed), slot.generation));
        }
        if !matched.is_empty() {
            let mut residency = self.residency.lock();
            for &(id, generation) in &matched {
                residency.touch(id, generation);
            }
        }
        matched.len()
    }

    /// Removes the block of `key`; returns whether there was one. A reader that already holds
    /// the block (a pin, a copy in progress) finishes with the old bytes; the space is freed
    /// when it lets go.
    pub fn remove(&self, key: &[u8]) -> bool {
        let hash = self.index.hash(key);
        let mut shard = self.index.shard(hash).write();
        let Some(slot) = shard.remove_if(hash, key, |_| true) else {
            return false;
        };
        self.residency.lock().remove(&slot);
        drop(shard);
        self.account_removed(&slot);
        self.counters.removes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// [`remove`](Self::remove) for many keys, in order.
    pub fn remove_batch(&self, keys: &[&[u8]]) -> Vec<bool> {
        keys.iter().map(|key| self.remove(key)).collect()
    }

    /// Current figures.
    pub fn stats(&self) -> EngineStats {
        let usage = self.dram.usage();
        let c = &self.counters;
        EngineStats {
            tiers: vec![TierStats {
                kind: TierKind::Dram,
                capacity_bytes: usage.capacity_bytes,
                used_bytes: usage.used_bytes,
                largest_free_bytes: usage.largest_free_bytes,
                free_extents: usage.free_extents,
                blocks: c.blocks.load(Ordering::Relaxed),
                payload_bytes: c.payload_bytes.load(Ordering::Relaxed),
                hits: c.hits.load(Ordering::Relaxed),
                misses: c.misses.load(Ordering::Relaxed),
                evictions: c.evictions.load(Ordering::Relaxed),
                huge_pages: self.dram.huge_page_mode(),
            }],
            puts: c.puts.load(Ordering::Relaxed),
            removes: c.removes.load(Ordering::Relaxed),
        }
    }

    fn put_one(&self, key: &[u8], value: &[u8]) -> Result<u64> {
        format::check_key(key)?;
        format::check_value(value)?;
        let block_len = format::encoded_len(key.len(), value.len(), DRAM_PAYLOAD_ALIGN);
        let extent = self.reserve(block_len as u64)?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let payload_offset = format::payload_offset(key.len(), DRAM_PAYLOAD_ALIGN);
        // Both fit in u32: the format's limits were checked above.
        let mut slot = Slot::new(
            key,
            self.index.hash(key),
            generation,
            payload_offset as u32,
            value.len() as u32,
            extent,
            Arc::clone(&self.dram),
        );
        // If encoding failed, dropping the slot would return the extent.
        let written =
            format::encode_into(slot.bytes_mut(), key, value, generation, DRAM_PAYLOAD_ALIGN)?;
        strict_assert!(written == block_len);
        strict_assert!(format::decode(&slot.bytes()[..block_len]).is_ok());
        self.publish(Arc::new(slot));
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        Ok(generation)
    }

    /// Makes a written slot visible. If a concurrent put of the same key already published a
    /// later generation, that one stays and this one is dropped: puts of one key take effect
    /// in generation order.
    fn publish(&self, slot: Arc<Slot>) {
        let mut shard = self.index.shard(slot.hash).write();
        if shard
            .find(slot.hash, &slot.key)
            .is_some_and(|c| c.generation > slot.generation)
        {
            return;
        }
        let replaced = shard.insert(Arc::clone(&slot));
        {
            // The residency lock nests inside a shard lock, never the other way round.
            let mut residency = self.residency.lock();
            if let Some(old) = &replaced {
                residency.remove(old);
            }
            residency.insert(&slot);
        }
        drop(shard);
        self.counters.blocks.fetch_add(1, Ordering::Relaxed);
        self.counters
            .payload_bytes
            .fetch_add(slot.payload_len.into(), Ordering::Relaxed);
        if let Some(old) = replaced {
            self.account_removed(&old);
        }
    }

    fn account_removed(&self, slot: &Slot) {
        self.counters.blocks.fetch_sub(1, Ordering::Relaxed);
        self.counters
            .payload_bytes
            .fetch_sub(slot.payload_len.into(), Ordering::Relaxed);
    }

    /// Allocates space for a block, evicting cold blocks as long as that can help.
    fn reserve(&self, len_bytes: u64) -> Result<mooncake_kv_tiers::Extent> {
        let no_space = || Error::NoSpace {
            required_bytes: len_bytes,
            capacity_bytes: self.dram.capacity_bytes(),
            used_bytes: self.dram.used_bytes(),
            pinned_bytes: self.residency.lock().pinned_bytes(),
        };
        if len_bytes > self.dram.capacity_bytes() {
            // Evicting could never make room: refuse before throwing anything out.
            return Err(no_space());
        }
        loop {
            match self.dram.allocate(len_bytes) {
                Ok(extent) => return Ok(extent),
                Err(mooncake_kv_tiers::Error::OutOfSpace { .. }) => {}
                Err(other) => return Err(other.into()),
            }
            if self.evict(len_bytes) == 0 {
                // Nothing left to evict; a concurrent remove may still have freed space.
                return self.dram.allocate(len_bytes).map_err(|_| no_space());
            }
        }
    }

    /// Brings usage back under the low watermark once it rises above the high one. One thread
    /// at a time; the others carry on.
    fn reclaim_above_high_watermark(&self) {
        let used = self.dram.used_bytes();
        if used <= self.config.high_watermark_bytes() {
            return;
        }
        if self.reclaiming.swap(true, Ordering::Acquire) {
            return;
        }
        let used = self.dram.used_bytes();
        let low = self.config.low_watermark_bytes();
        if used > low {
            self.evict(used - low);
        }
        self.reclaiming.store(false, Ordering::Release);
    }

    /// Evicts the coldest unpinned blocks until their extents add up to `target_bytes`, or no
    /// block can be evicted. Returns the bytes of the extents evicted (freed now, or when the
    /// last reader of each lets go).
    fn evict(&self, target_bytes: u64) -> u64 {
        let mut evicted_bytes = 0;
        // Pinned blocks are skipped and put back as recently used; stop once every block that
        // was resident at the start has been looked at, so an all-pinned tier ends the loop.
        let mut budget = self.residency.lock().policy.len();
        while evicted_bytes < target_bytes && budget > 0 {
            let mut victims = Vec::with_capacity(EVICTION_BATCH);
            let mut skipped = Vec::new();
            {
                let mut residency = self.residency.lock();
                while victims.len() < EVICTION_BATCH && budget > 0 {
                    let Some(slot) = residency.pop_victim() else {
                        budget = 0;
                        break;
                    };
                    budget -= 1;
                    if slot.is_pinned() {
                        skipped.push(slot)
                    } else {
                        victims.push(slot)
                    }
                }
                for slot in &skipped {
                    residency.insert(slot);
                }
            }
            for victim in victims {
                let mut shard = self.index.shard(victim.hash).write();
                let removed = shard.remove_if(victim.hash, &victim.key, |current| {
                    Arc::ptr_eq(current, &victim) && !victim.is_pinned()
                });
                if removed.is_none() {
                    let in_index = shard
                        .find(victim.hash, &victim.key)
                        .is_some_and(|current| Arc::ptr_eq(current, &victim));
                    if in_index {
                        // Pinned after it was chosen: it stays, as recently used.
                        self.residency.lock().insert(&victim);
                    }
                    // Otherwise it was removed or overwritten meanwhile, and accounted for.
                    continue;
                }
                drop(shard);
                self.account_removed(&victim);
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                evicted_bytes += victim.extent_len_bytes();
            }
        }
        evicted_bytes
    }

    /// Looks a key up for a read, counting the hit or miss and the use.
    fn lookup_for_read(&self, key: &[u8]) -> Option<Arc<Slot>> {
        let Some(slot) = self.index.get(key) else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.touch(&slot);
        Some(slot)
    }

    fn touch(&self, slot: &Slot) {
        self.residency
            .lock()
            .touch(slot.entry.load(Ordering::Relaxed), slot.generation);
    }

    /// Checks the block's header against what the index says it holds and returns the payload
    /// in place. A block that fails is dropped from the index, so it is reported once and never
    /// served.
    fn verified_payload<'a>(&self, slot: &'a Slot) -> Result<&'a [u8]> {
        match self.verify(slot) {
            Ok(payload) => Ok(payload),
            Err(error) => {
                tracing::error!(%error, generation = slot.generation, "corrupt block in DRAM; dropping it");
                let mut shard = self.index.shard(slot.hash).write();
                let removed =
                    shard.remove_if(slot.hash, &slot.key, |s| s.generation == slot.generation);
                if let Some(removed) = removed {
                    self.residency.lock().remove(&removed);
                    drop(shard);
                    self.account_removed(&removed);
                }
                Err(error)
            }
        }
    }

    fn verify<'a>(&self, slot: &'a Slot) -> Result<&'a [u8]> {
        let bytes = slot.bytes();
        let header = format::decode_header(bytes)?;
        let mismatch = |detail| Error::BlockMismatch {
            expected_generation: slot.generation,
            found_generation: header.generation,
            detail,
        };
        if header.generation != slot.generation {
            return Err(mismatch("generation"));
        }
        if header.payload_offset != slot.payload_offset || header.payload_len != slot.payload_len {
            return Err(mismatch("payload position"));
        }
        // The header is valid, so key and payload lie within the extent the block was
        // written into.
        let key_end = HEADER_BYTES + usize::from(header.key_len);
        if bytes.get(HEADER_BYTES..key_end) != Some(&slot.key[..]) {
            return Err(mismatch("key"));
        }
        let payload = bytes
            .get(header.payload_offset as usize..header.block_len())
            .ok_or(mismatch("payload beyond extent"))?;
        if self.config.verify_payload_on_dram_read || cfg!(feature = "strict-assertions") {
            let actual = crc32fast::hash(payload);
            if actual != header.payload_crc32 {
                return Err(Error::PayloadChecksum {
                    expected: header.payload_crc32,
                    actual,
                });
            }
        }
        Ok(payload)
    }
}
