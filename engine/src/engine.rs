//! The engine: index, per-tier residency (eviction order), movement between DRAM and NVMe,
//! pins, and the public API.
//!
//! # Locks and their order
//!
//! `Store::meta_lock` -> index shard -> slot `locations` -> residency (one per tier). A thread
//! holding a lock only ever takes locks to its right. Map commits and the location changes that
//! depend on them happen under `meta_lock`, so a block removed or overwritten while it is being
//! persisted either is skipped by the commit or has its new map entry deleted right after.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use mooncake_kv_tiers::{
    DeviceMemory, DeviceRange, DramConfig, DramTier, HbmConfig, HbmTier, HugePageMode, Tier,
    TierKind, ToDevice,
};
use parking_lot::{Condvar, Mutex, RwLockWriteGuard};

use crate::eviction::{EntryHint, EntryId, EvictionPolicy, new_policy_holding};
use crate::format::Error as FormatError;
use crate::format::{self, HEADER_BYTES};
use crate::index::{Index, ShardMap};
use crate::slot::{
    DRAM, DramCopy, HBM, HbmCopy, Lineage, Locations, NOT_RESIDENT, NVME, NvmeCopy, Slot, TIERS,
    dram_extent_len,
};
use crate::store::{BlockWrite, NVME_PAYLOAD_ALIGN, Store, StoreConfig};
use crate::{EngineConfig, Error, Result, strict_assert};

/// Payloads in DRAM start on a cache line, so copies out of the tier run at full speed.
const DRAM_PAYLOAD_ALIGN: usize = 64;
/// Victims taken from a policy per lock acquisition, and blocks demoted per batch.
const BATCH: usize = 32;
/// Blocks written per batch by `flush`: one data sync and one metadata sync each.
const FLUSH_BATCH: usize = 1024;
/// How often the background reclaimer looks at DRAM usage when nobody wakes it.
const RECLAIM_POLL: Duration = Duration::from_millis(50);
/// A put that finds a tier full of blocks it cannot move, while other threads or readers
/// hold space that is on its way back, waits at most this many times this long before it
/// reports `NoSpace`: 2 s in all, never forever.
const MAX_SPACE_WAITS: u32 = 2000;
const SPACE_WAIT: Duration = Duration::from_millis(1);
/// A read finds its key's block retired under it (overwritten, say) at most this many times
/// before it reports an error instead of trying again.
const MAX_RETIRED_READS: usize = 8;

/// What reading a slot the index gave found.
#[must_use]
enum SlotRead<T> {
    /// The block, read and verified.
    Read(T),
    /// The slot was retired after the lookup, before a copy was in hand: look the key up again.
    Retired,
}

impl<T> SlotRead<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> SlotRead<U> {
        match self {
            Self::Read(value) => SlotRead::Read(f(value)),
            Self::Retired => SlotRead::Retired,
        }
    }
}

/// How a put is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// The block lives in DRAM until it is demoted, flushed or evicted. A crash loses it.
    #[default]
    Memory,
    /// The put returns after the block is on NVMe and its map entry is committed: it survives
    /// a crash. Needs a data directory.
    WriteThrough,
}

/// Whether a chain's block is full, or partial and so the chain's last
/// ([`Engine::put_chain_with`] for its last block, [`ChainPut::commit`] for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ChainEnd {
    /// A full block: a longer prompt with the same start goes through it, so the chain may
    /// grow past it.
    #[default]
    Full,
    /// Fewer tokens than a full block (a prompt rarely ends on a block boundary). A longer
    /// prompt's block at this place holds more tokens, so has another key: only the same
    /// prompt again can use this one. On the production conversation trace 0.8% of such
    /// blocks are used again, against 26% of full ones, and
    /// [`PrefixAware`](crate::eviction::PrefixAware) evicts them first until one is hit.
    Partial,
}

/// An embeddable, thread-safe KVCache block store.
///
/// Share it between threads with `Arc<Engine>`; every method takes `&self`. Dropping it stops
/// the background reclaimer and closes the data directory; blocks only in DRAM are gone.
pub struct Engine {
    inner: Arc<Inner>,
    reclaimer: Option<JoinHandle<()>>,
}

struct Inner {
    config: EngineConfig,
    dram: Arc<DramTier>,
    /// The GPU memory tier above DRAM, if configured.
    hbm: Option<Arc<HbmTier>>,
    store: Option<Store>,
    index: Index,
    residency: [Mutex<Residency>; TIERS],
    next_generation: AtomicU64,
    /// Set while one thread brings DRAM usage back under the low watermark.
    reclaiming: AtomicBool,
    /// The same for HBM.
    reclaiming_hbm: AtomicBool,
    /// A promotion found no room below the high watermark: the reclaimer should bring DRAM
    /// down to its low mark even though usage has not passed the high one.
    room_wanted: AtomicBool,
    /// Generations below this were recovered from the data directory at open.
    first_new_generation: AtomicU64,
    /// DRAM victims taken from the policy and not yet dealt with: space another thread is
    /// about to free.
    victims_in_flight: AtomicUsize,
    wake: (Mutex<bool>, Condvar),
    stop: AtomicBool,
    counters: Counters,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<PinnedBlock>();
};

#[derive(Debug, Default)]
struct TierCounters {
    blocks: AtomicU64,
    payload_bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Debug, Default)]
struct Counters {
    tiers: [TierCounters; TIERS],
    puts: AtomicU64,
    removes: AtomicU64,
    demotions: AtomicU64,
    promotions: AtomicU64,
    corrupt_blocks: AtomicU64,
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
    /// Blocks with a copy on this tier.
    pub blocks: u64,
    /// Payload bytes of those blocks.
    pub payload_bytes: u64,
    /// Reads served from this tier.
    pub hits: u64,
    /// Reads that reached this tier and did not find their block on it.
    pub misses: u64,
    /// Copies dropped from this tier to make room (demoted ones included).
    pub evictions: u64,
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
    /// Blocks written from DRAM to NVMe to make room in DRAM.
    pub demotions: u64,
    /// Blocks copied from NVMe into DRAM on a read.
    pub promotions: u64,
    /// Blocks that failed verification on a read; each is reported once, dropped, never served.
    pub corrupt_blocks: u64,
    /// What pages the DRAM region got.
    pub huge_pages: HugePageMode,
    /// The NVMe tier's I/O backend (`"io_uring"` or `"psync"`), if there is a tier.
    pub nvme_io_backend: Option<&'static str>,
    /// Whether io_uring was unavailable and the NVMe tier fell back to psync.
    pub nvme_io_fell_back: bool,
}

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
struct Held(Arc<Slot>);

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

/// One prefix chain being put block by block ([`Engine::chain`]): each block put or committed
/// through it follows the one before it, as in [`Engine::put_chain_with`]. A block that
/// fails breaks the link: the next one is recorded as having a parent the engine does not
/// hold.
pub struct ChainPut<'a> {
    engine: &'a Engine,
    /// The block put last (or the named parent), pinned so that the eviction that makes room
    /// for the next cannot take it before the next links to it.
    previous: Option<Held>,
    /// Whether the next block has a parent (named, or put before it here).
    linked: bool,
}

impl ChainPut<'_> {
    /// Room for the chain's next block; as [`Engine::reserve`].
    ///
    /// # Errors
    ///
    /// As [`Engine::reserve`]; the link to the previous block is then broken.
    pub fn reserve(&mut self, key: &[u8], payload_len: usize) -> Result<Reservation> {
        let reserved = self.engine.reserve(key, payload_len);
        if reserved.is_err() {
            self.previous = None;
            self.linked = true;
        }
        reserved
    }

    /// Commits the chain's next block, `end` saying whether it is full or a partial last
    /// block; as [`Engine::commit`].
    ///
    /// # Errors
    ///
    /// As [`Engine::commit`]; the link to the previous block is then broken.
    pub fn commit(
        &mut self,
        reservation: Reservation,
        durability: Durability,
        end: ChainEnd,
    ) -> Result<u64> {
        let lineage = self.next_lineage(end);
        let engine = self.engine;
        let mut published = false;
        let committed = engine.commit_linked(reservation, durability, lineage, |slot| {
            published = true;
            self.previous = Some(engine.inner.hold(Arc::clone(slot)));
        });
        if !published {
            self.previous = None;
        }
        committed
    }

    /// The lineage of the next block. The previous block stays pinned until the next one is
    /// published ([`link`](Self::link)).
    fn next_lineage(&mut self, end: ChainEnd) -> Lineage {
        let mut lineage = match self.previous.as_ref() {
            Some(held) => Lineage::child_of(&held.0),
            None if self.linked => Lineage::orphan(),
            None => Lineage::default(),
        };
        lineage.partial = end == ChainEnd::Partial;
        self.linked = true;
        lineage
    }

    /// After the put of the block [`next_lineage`](Self::next_lineage) was for: holds it as
    /// the next one's parent, letting the previous one go; or, if it failed, breaks the link.
    fn link(&mut self, put: Result<Arc<Slot>>) -> Result<u64> {
        match put {
            Ok(slot) => {
                let generation = slot.generation;
                self.previous = Some(self.engine.inner.hold(slot));
                Ok(generation)
            }
            Err(error) => {
                self.previous = None;
                Err(error)
            }
        }
    }
}

impl fmt::Debug for ChainPut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainPut")
            .field("holds_previous", &self.previous.is_some())
            .field("linked", &self.linked)
            .finish()
    }
}

/// DRAM space reserved for one block by [`Engine::reserve`], not yet visible to readers.
/// Dropping it returns the space; [`Engine::commit`] makes it a block.
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

/// One tier's eviction policy and the table that maps its entry ids back to slots.
#[derive(Debug)]
struct Residency {
    tier: usize,
    policy: Box<dyn EvictionPolicy>,
    /// Indexed by entry id. The generation sits beside the slot so that checking an id
    /// against a generation reads this array only.
    slots: Vec<(u64, Option<Arc<Slot>>)>,
    free_ids: Vec<EntryId>,
}

impl Residency {
    fn new(tier: usize, config: &EngineConfig) -> Self {
        Self {
            tier,
            policy: new_policy_holding(config.eviction_policy, config.hold_chain_parents),
            slots: Vec::new(),
            free_ids: Vec::new(),
        }
    }

    /// Starts tracking `slot`, unless it already is.
    fn insert(&mut self, slot: &Arc<Slot>) {
        if self.holds(
            slot.entries[self.tier].load(Ordering::Relaxed),
            slot.generation,
        ) {
            return;
        }
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
        // The parent's entry, if it is resident here (checked by generation, since ids are
        // reused).
        let parent = slot
            .lineage
            .parent
            .as_ref()
            .and_then(Weak::upgrade)
            .and_then(|parent| {
                let parent_id = parent.entries[self.tier].load(Ordering::Relaxed);
                self.holds(parent_id, parent.generation)
                    .then_some(parent_id)
            });
        self.slots[id as usize] = (slot.generation, Some(Arc::clone(slot)));
        slot.entries[self.tier].store(id, Ordering::Relaxed);
        self.policy.insert(
            id,
            EntryHint {
                key_hash: slot.hash,
                parent,
                depth: slot.lineage.depth,
                partial: slot.lineage.partial,
            },
        );
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
        let id = slot.entries[self.tier].load(Ordering::Relaxed);
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

    /// Tells the policy that the chain of blocks `chain` (entry ids per tier and generation,
    /// head first) ended, from its deepest block resident here. Returns whether there was
    /// one.
    fn chain_ended(&mut self, chain: &[([EntryId; TIERS], u64)]) -> bool {
        let Some(&(ids, _)) = chain
            .iter()
            .rev()
            .find(|&&(ids, generation)| self.holds(ids[self.tier], generation))
        else {
            return false;
        };
        self.policy.chain_ended(ids[self.tier]);
        true
    }

    /// The next victim among the blocks `evictable` accepts; the others stay, as just used.
    fn pop_victim(&mut self, evictable: impl Fn(&Slot) -> bool) -> Option<Arc<Slot>> {
        self.pop_victim_judged(evictable).map(|(slot, _)| slot)
    }

    /// [`pop_victim`](Self::pop_victim), and whether the policy expects the victim to be used
    /// again (if not, a tier below need not keep it).
    fn pop_victim_judged(
        &mut self,
        evictable: impl Fn(&Slot) -> bool,
    ) -> Option<(Arc<Slot>, bool)> {
        let slots = &self.slots;
        let id = self.policy.pop_victim(&mut |id| {
            slots
                .get(id as usize)
                .and_then(|(_, slot)| slot.as_deref())
                .is_some_and(&evictable)
        })?;
        let has_future = !self.policy.victim_has_no_future();
        Some((self.release(id), has_future))
    }

    fn release(&mut self, id: EntryId) -> Arc<Slot> {
        let (_, slot) = std::mem::take(&mut self.slots[id as usize]);
        let slot = slot.expect("policy tracks only resident ids");
        slot.entries[self.tier].store(NOT_RESIDENT, Ordering::Relaxed);
        self.free_ids.push(id);
        slot
    }

    fn resident(&self) -> Vec<Arc<Slot>> {
        self.slots
            .iter()
            .filter_map(|(_, slot)| slot.clone())
            .collect()
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.wake_reclaimer();
        if let Some(handle) = self.reclaimer.take() {
            let _ = handle.join();
        }
        // A clean close commits pending removals; blocks only in DRAM are not written (that is
        // what `flush` is for).
        if let Some(store) = &self.inner.store {
            let _meta = store.meta_lock.lock();
            if let Err(error) = store.commit(&[], &[]) {
                tracing::warn!(%error, "pending removals not committed at close");
            }
        }
    }
}

impl Engine {
    /// Opens an engine: validates the config, maps the DRAM tier and, with a `data_dir`, opens
    /// (or creates) the data directory and serves every block persisted in it again.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first invalid field; [`Error::Tier`] if the DRAM region
    /// or the data file cannot be created; [`Error::DirectoryInUse`] if another process has
    /// the directory open; [`Error::IncompatibleDataDir`] if it has another format version or
    /// its files disagree (nothing is changed then); [`Error::Metadata`] for RocksDB errors.
    pub fn open(config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let device = match &config.hbm {
            None => None,
            Some(settings) => Some(open_gpu(settings.device)?),
        };
        Self::open_inner(config, device)
    }

    /// [`open`](Self::open) with the HBM tier on `device` instead of the GPU the config
    /// names: for embedders that manage their GPU themselves, and for tests of the tier logic
    /// on [`HostTestDevice`](crate::HostTestDevice), which no config can select.
    ///
    /// # Errors
    ///
    /// Those of `open`; [`Error::Config`] if the config has no `hbm` settings.
    pub fn open_with_device(config: EngineConfig, device: Arc<dyn DeviceMemory>) -> Result<Self> {
        config.validate()?;
        if config.hbm.is_none() {
            return Err(Error::Config {
                field: "hbm",
                reason: "a device was given but the config has no hbm settings".into(),
            });
        }
        Self::open_inner(config, Some(device))
    }

    fn open_inner(config: EngineConfig, device: Option<Arc<dyn DeviceMemory>>) -> Result<Self> {
        // The GPU first: if it cannot hold the tier, nothing else is created.
        let hbm = match (&config.hbm, device) {
            (Some(settings), Some(device)) => Some(Arc::new(HbmTier::open(
                device,
                HbmConfig {
                    capacity_bytes: settings.capacity_bytes,
                    ..HbmConfig::default()
                },
            )?)),
            _ => None,
        };
        let dram = DramTier::open(DramConfig {
            capacity_bytes: config.dram_capacity_bytes,
            huge_pages: config.dram_huge_pages,
            populate: config.dram_populate,
            ..DramConfig::default()
        })?;
        let store = match &config.data_dir {
            None => None,
            Some(dir) => Some(Store::open(&StoreConfig {
                dir: dir.clone(),
                nvme_capacity_bytes: config.nvme_capacity_bytes,
                io_backend: config.nvme_io_backend,
                io_depth: config.nvme_io_depth,
            })?),
        };
        let inner = Arc::new(Inner {
            index: Index::new(config.index_shards),
            residency: [
                Mutex::new(Residency::new(DRAM, &config)),
                Mutex::new(Residency::new(NVME, &config)),
                Mutex::new(Residency::new(HBM, &config)),
            ],
            dram: Arc::new(dram),
            hbm,
            store,
            next_generation: AtomicU64::new(1),
            reclaiming: AtomicBool::new(false),
            reclaiming_hbm: AtomicBool::new(false),
            room_wanted: AtomicBool::new(false),
            first_new_generation: AtomicU64::new(1),
            victims_in_flight: AtomicUsize::new(0),
            wake: (Mutex::new(false), Condvar::new()),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            config,
        });
        inner.recover()?;
        let reclaimer = if inner.store.is_some() {
            let background = Arc::clone(&inner);
            Some(
                std::thread::Builder::new()
                    .name("mooncake-reclaimer".into())
                    .spawn(move || background.run_reclaimer())
                    .map_err(|source| Error::DataDir {
                        path: PathBuf::new(),
                        action: "start the reclaimer thread",
                        source,
                    })?,
            )
        } else {
            None
        };
        Ok(Self { inner, reclaimer })
    }

    /// The configuration the engine was opened with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The DRAM tier, for registering its region with a transfer engine.
    pub fn dram(&self) -> &DramTier {
        &self.inner.dram
    }

    /// The DRAM tier, shared: what a node registers for one-sided reads. The region stays
    /// mapped as long as any handle lives, even after the engine is dropped.
    pub fn dram_shared(&self) -> Arc<DramTier> {
        Arc::clone(&self.inner.dram)
    }

    /// The node id of the data directory (created once, when it was first opened).
    pub fn node_id(&self) -> Option<[u8; 16]> {
        self.inner.store.as_ref().map(|s| s.node.node_id)
    }

    /// Stores `value` under `key` in DRAM, replacing any block the key had, and returns the
    /// new block's generation (greater than that of any block put before it).
    ///
    /// The value is copied once, straight into the tier, and checksummed in the same pass.
    /// If DRAM is full, the coldest unpinned blocks are demoted to NVMe (or evicted, without
    /// a data directory) to make room.
    ///
    /// # Errors
    ///
    /// [`Error::Format`] for an empty or too long key or a too large value; [`Error::NoSpace`]
    /// if the block does not fit even after evicting every block that may be evicted.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<u64> {
        self.put_with(key, value, Durability::Memory)
    }

    /// [`put`](Self::put) with a choice of durability.
    ///
    /// # Errors
    ///
    /// Those of `put`; with [`Durability::WriteThrough`], [`Error::NotPersistent`] without a
    /// data directory, and the errors of persisting (the block then stays in DRAM, not
    /// durable).
    pub fn put_with(&self, key: &[u8], value: &[u8], durability: Durability) -> Result<u64> {
        let inner = &self.inner;
        if durability == Durability::WriteThrough && inner.store.is_none() {
            return Err(Error::NotPersistent);
        }
        let slot = inner.put_one(key, value, Lineage::default())?;
        let generation = slot.generation;
        inner.after_puts();
        if durability == Durability::WriteThrough {
            inner.persist(vec![slot]).remove(0)?;
        }
        Ok(generation)
    }

    /// The first half of a two-phase put: reserves DRAM space for a block of `payload_len`
    /// bytes under `key` (evicting as a put would), invisible to readers. Fill the payload
    /// (locally with [`Reservation::payload_mut`], or let a peer write it one-sidedly at
    /// [`Reservation::payload_region_offset`] of the shared region), then
    /// [`commit`](Self::commit). Dropping the reservation returns the space.
    ///
    /// # Errors
    ///
    /// As [`put`](Self::put).
    pub fn reserve(&self, key: &[u8], payload_len: usize) -> Result<Reservation> {
        self.inner.reserve(key, payload_len)
    }

    /// The second half of a two-phase put: checksums the payload where it lies, writes the
    /// header and key, and makes the block visible, replacing any block the key had. The
    /// payload is never copied. Returns the block's generation.
    ///
    /// # Errors
    ///
    /// With [`Durability::WriteThrough`], as [`put_with`](Self::put_with).
    pub fn commit(&self, reservation: Reservation, durability: Durability) -> Result<u64> {
        self.commit_linked(reservation, durability, Lineage::default(), |_| {})
    }

    /// [`commit`](Self::commit) with the block's place in its chain; `published` sees the
    /// block once it is visible, before anything is evicted to make up for it and before the
    /// write-through (if any).
    fn commit_linked(
        &self,
        reservation: Reservation,
        durability: Durability,
        lineage: Lineage,
        published: impl FnOnce(&Arc<Slot>),
    ) -> Result<u64> {
        let inner = &self.inner;
        if durability == Durability::WriteThrough && inner.store.is_none() {
            return Err(Error::NotPersistent);
        }
        let slot = inner.commit(reservation, lineage)?;
        let generation = slot.generation;
        published(&slot);
        inner.after_puts();
        if durability == Durability::WriteThrough {
            inner.persist(vec![slot]).remove(0)?;
        }
        Ok(generation)
    }

    /// [`put`](Self::put) for many blocks; one result per item, in order. A failed item does
    /// not stop the others.
    pub fn put_batch(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<u64>> {
        if self.inner.hbm.is_some() {
            let results = self.inner.put_batch_hbm(items);
            self.inner.after_puts();
            return results;
        }
        let results = items
            .iter()
            .map(|(key, value)| {
                self.inner
                    .put_one(key, value, Lineage::default())
                    .map(|slot| slot.generation)
            })
            .collect();
        self.inner.after_puts();
        results
    }

    /// Puts the blocks of a prefix chain, in order, recording that each follows the one
    /// before it, and the first follows `parent` (the key of the block before them, if the
    /// chain continues one the engine may hold). One result per item, in order; a failed item
    /// does not stop the others.
    ///
    /// The links are hints for eviction: with
    /// [`EvictionPolicyKind::PrefixAware`](crate::EvictionPolicyKind::PrefixAware), a block is not evicted while a block put
    /// after it is resident, since `prefix_match` could not reach that one without it. They
    /// cost a pointer and a depth per block, are never persisted, and a block put again
    /// (with [`put`](Self::put) or here) takes the links of its latest put.
    pub fn put_chain(&self, parent: Option<&[u8]>, items: &[(&[u8], &[u8])]) -> Vec<Result<u64>> {
        self.put_chain_with(parent, items, ChainEnd::Full)
    }

    /// [`put_chain`](Self::put_chain), saying whether the chain's last block is full or
    /// partial ([`ChainEnd`]). A partial last block is a hint for eviction like the links.
    pub fn put_chain_with(
        &self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> Vec<Result<u64>> {
        let mut chain = self.chain(parent);
        let results = items
            .iter()
            .enumerate()
            .map(|(index, &(key, value))| {
                let end = if index + 1 == items.len() {
                    end
                } else {
                    ChainEnd::Full
                };
                let lineage = chain.next_lineage(end);
                chain.link(self.inner.put_one(key, value, lineage))
            })
            .collect();
        drop(chain);
        self.inner.after_puts();
        results
    }

    /// Starts putting a prefix chain block by block, the first block following `parent` (the
    /// key of the block before them, if the chain continues one the engine may hold): what
    /// [`put_chain_with`](Self::put_chain_with) does, for a writer that fills
    /// [`Reservation`]s (a node receiving values straight into DRAM). The [`ChainPut`] pins
    /// the block put last (so that room for the next cannot be made by evicting it): drop it
    /// when the chain is done.
    pub fn chain(&self, parent: Option<&[u8]>) -> ChainPut<'_> {
        ChainPut {
            engine: self,
            previous: parent
                .and_then(|key| self.inner.index.get(key))
                .map(|slot| self.inner.hold(slot)),
            linked: parent.is_some(),
        }
    }

    /// Copies the value of `key` into a new `Vec`. `Ok(None)` is a miss.
    ///
    /// # Errors
    ///
    /// A corruption error ([`Error::Format`] for a bad checksum, [`Error::BlockMismatch`]) if the
    /// block fails verification; the block is then dropped, so it is reported once and never
    /// served. [`Error::Tier`] if reading NVMe fails.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.read_current(key, |slot| {
            let hbm_only = {
                let locations = slot.locations.read();
                locations
                    .dram
                    .is_none()
                    .then(|| locations.hbm.clone())
                    .flatten()
            };
            if let Some(hbm) = hbm_only {
                // Straight from the device into the value's buffer: one copy.
                let mut out = vec![0u8; slot.payload_len as usize];
                self.inner.get_into_from_hbm(slot, &hbm, &mut out)?;
                return Ok(SlotRead::Read(out));
            }
            let mut out = Vec::new();
            let read = self
                .inner
                .read_slot(slot, |payload| out.extend_from_slice(payload))?;
            Ok(read.map(|()| out))
        })
    }

    /// [`get`](Self::get) for many keys; one result per key, in order.
    pub fn get_batch(&self, keys: &[&[u8]]) -> Vec<Result<Option<Vec<u8>>>> {
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// Copies the value of `key` into the start of `target` and returns its length. From DRAM,
    /// exactly one copy. From NVMe, when `target` starts on a 4 KiB boundary and has room for
    /// the payload rounded up to 4 KiB, the device writes straight into it; otherwise through
    /// a bounce buffer. Everything is verified first. `Ok(None)` is a miss.
    ///
    /// # Errors
    ///
    /// [`Error::BufferTooSmall`] if `target` is shorter than the value; the errors of
    /// [`get`](Self::get).
    pub fn get_into(&self, key: &[u8], target: &mut [u8]) -> Result<Option<usize>> {
        self.inner.get_into(key, target)
    }

    /// Copies the value of `key` into device memory at `target` (an inference engine's KV
    /// pages, on the HBM tier's GPU) and returns its length. From HBM the copy stays on the
    /// device, and the block's header and key, read in the same trip, are checked after it
    /// (the payload CRC is checked when the block is written, as for DRAM); from DRAM or NVMe
    /// the block is read and fully verified on the host, then copied to the device. `Ok(None)`
    /// is a miss. After an error, the bytes at `target` are unspecified.
    ///
    /// # Safety
    ///
    /// `target` is memory on the HBM tier's device that the caller owns, and nothing else
    /// reads or writes it until the call returns.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] without an HBM tier; [`Error::BufferTooSmall`] if `target` is shorter
    /// than the value; the errors of [`get`](Self::get); [`Error::Tier`] for a failed device
    /// copy.
    #[expect(unsafe_code, reason = "device memory the caller names by address")]
    pub unsafe fn get_into_device(&self, key: &[u8], target: DeviceRange) -> Result<Option<usize>> {
        // SAFETY: passed on from this function's contract.
        unsafe { self.inner.get_into_device(key, target) }
    }

    /// [`get_into`](Self::get_into) for many keys, each with its own target buffer.
    pub fn get_into_batch(&self, items: &mut [(&[u8], &mut [u8])]) -> Vec<Result<Option<usize>>> {
        items
            .iter_mut()
            .map(|(key, target)| self.get_into(key, target))
            .collect()
    }

    /// Pins the block of `key` in DRAM and returns a guard that reads its payload without a
    /// copy. A block only on NVMe is brought into DRAM first. The block is neither evicted nor
    /// moved while the guard lives. `Ok(None)` is a miss.
    ///
    /// # Errors
    ///
    /// The errors of [`get`](Self::get); [`Error::NoSpace`] if an NVMe-only block cannot be
    /// brought into DRAM.
    pub fn pin(&self, key: &[u8]) -> Result<Option<PinnedBlock>> {
        self.inner.pin(key)
    }

    /// Whether `key` has a block. Does not count as a use for eviction.
    pub fn exists(&self, key: &[u8]) -> bool {
        self.inner.index.contains(key)
    }

    /// The keys of every block held now, in no particular order: a snapshot, taken one index
    /// shard at a time (a key put or removed meanwhile may or may not be in it). For repair
    /// and inspection; it copies every key.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        self.inner.index.for_each_key(|key| keys.push(key.to_vec()));
        keys
    }

    /// [`exists`](Self::exists) for many keys, in order.
    pub fn exists_batch(&self, keys: &[&[u8]]) -> Vec<bool> {
        keys.iter().map(|key| self.exists(key)).collect()
    }

    /// How many leading keys of a chain have blocks: the length of the cached prefix. Stops at
    /// the first key without one. The blocks of the matched prefix count as used, since a
    /// scheduler asks this just before it reads them.
    pub fn prefix_match(&self, keys: &[&[u8]]) -> usize {
        self.inner.prefix_match(keys)
    }

    /// Counts a use of each of `keys` that has a block, for eviction, as a read would: for
    /// reads the engine did not serve itself (a client reading one-sidedly through a
    /// descriptor it kept, which reports them later). Returns how many had blocks.
    pub fn touch(&self, keys: &[&[u8]]) -> usize {
        self.inner.touch_keys(keys)
    }

    /// Says that the prefix chain `keys` (head first) is over: its conversation or task has
    /// ended, so no request will extend it or read it again. A hint for eviction, like the
    /// links of [`put_chain`](Self::put_chain): in each tier, the prefix-aware policy lets the
    /// chain's blocks go before all others, tail first, from the deepest block the tier holds
    /// up to the first one another resident chain goes through (a head shared with other
    /// conversations, such as a system prompt, keeps its place). LRU and S3-FIFO ignore it.
    /// A block used afterwards is ranked as any other, so a wrong hint costs at most a miss.
    /// Keys without a block are skipped; returns whether any tier held a block of the chain.
    ///
    /// On the production conversation trace, a caller that says this for every conversation
    /// it ends lifts the default policy's prefix hits from 13.7 / 21.7 / 29.6% to 21.3 / 33.8
    /// / 36.2% at 2 / 5 / 10% capacity (`kvctl replay --end-hints`).
    pub fn end_chain(&self, keys: &[&[u8]]) -> bool {
        self.inner.end_chain(keys)
    }

    /// Removes the block of `key`; returns whether there was one. A reader that already holds
    /// the block (a pin, a copy in progress) finishes with the old bytes; the space is freed
    /// when it lets go. On NVMe, the map entry is deleted at the next commit (a flush, a
    /// write-through put, a demotion, closing the engine): a crash before that brings the
    /// block back.
    pub fn remove(&self, key: &[u8]) -> bool {
        self.inner.remove_if(key, None)
    }

    /// [`remove`](Self::remove), but only the block of `generation`: a newer put of the key
    /// stays. Returns whether it removed one. For reconciling copies without losing a write
    /// that arrived meanwhile.
    pub fn remove_generation(&self, key: &[u8], generation: u64) -> bool {
        self.inner.remove_if(key, Some(generation))
    }

    /// The generation of `key`'s block, without reading it or counting a use. `None` if the
    /// key has no block.
    pub fn generation(&self, key: &[u8]) -> Option<u64> {
        self.inner.index.get(key).map(|slot| slot.generation)
    }

    /// The generation the first put after this engine opened got (or will get): every block
    /// with a smaller one was read back from the data directory at open.
    pub fn first_new_generation(&self) -> u64 {
        self.inner.first_new_generation.load(Ordering::Relaxed)
    }

    /// [`remove`](Self::remove) for many keys, in order.
    pub fn remove_batch(&self, keys: &[&[u8]]) -> Vec<bool> {
        keys.iter().map(|key| self.remove(key)).collect()
    }

    /// Makes every block the engine holds durable: writes each block that is only in DRAM to
    /// NVMe (it stays in DRAM too), commits the map, and commits pending removals. Returns the
    /// number of blocks written.
    ///
    /// # Errors
    ///
    /// [`Error::NotPersistent`] without a data directory; [`Error::NoSpace`] if NVMe cannot
    /// hold them all; I/O and metadata errors (after which the engine is poisoned).
    pub fn flush(&self) -> Result<usize> {
        self.inner.flush()
    }

    /// Current figures.
    pub fn stats(&self) -> EngineStats {
        self.inner.stats()
    }
}

impl Inner {
    fn reserve(&self, key: &[u8], payload_len: usize) -> Result<Reservation> {
        format::check_key(key)?;
        if payload_len > format::MAX_VALUE_BYTES {
            return Err(format::Error::ValueTooLarge {
                len_bytes: payload_len,
                max_bytes: format::MAX_VALUE_BYTES,
            }
            .into());
        }
        let block_len = format::encoded_len(key.len(), payload_len, DRAM_PAYLOAD_ALIGN);
        let extent = self.reserve_dram(dram_extent_len(block_len, payload_len))?;
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

    fn commit(&self, reservation: Reservation, lineage: Lineage) -> Result<Arc<Slot>> {
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
    fn publish_written(
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
    fn publish_new(
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
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        slot
    }

    /// The part of an HBM block before its payload (header, key, padding), made on the host;
    /// the value goes to the device as it is, checksummed where it lies.
    fn hbm_head(key: &[u8], value: &[u8], generation: u64) -> Result<Vec<u8>> {
        let mut head = vec![0u8; format::payload_offset(key.len(), DRAM_PAYLOAD_ALIGN)];
        format::encode_head(&mut head, key, value, generation, DRAM_PAYLOAD_ALIGN)?;
        Ok(head)
    }

    fn put_one(&self, key: &[u8], value: &[u8], lineage: Lineage) -> Result<Arc<Slot>> {
        format::check_key(key)?;
        format::check_value(value)?;
        let block_len = format::encoded_len(key.len(), value.len(), DRAM_PAYLOAD_ALIGN);
        if let Some(extent) = self.reserve_hbm(block_len as u64) {
            return self.put_into_hbm(extent, key, value, block_len, lineage);
        }
        // No HBM tier, or it cannot take the block (larger than the tier, nothing to demote):
        // DRAM.
        let extent = self.reserve_dram(dram_extent_len(block_len, value.len()))?;
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
    fn put_into_hbm(
        &self,
        extent: mooncake_kv_tiers::Extent,
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
    fn put_batch_hbm(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<u64>> {
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
            let mut batch: Vec<mooncake_kv_tiers::ExtentParts<'_>> = extents
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

    /// Allocates HBM for a block, demoting cold blocks to DRAM as long as that helps. `None`
    /// without an HBM tier, or when the block cannot fit there.
    fn reserve_hbm(&self, len_bytes: u64) -> Option<mooncake_kv_tiers::Extent> {
        let hbm = self.hbm.as_ref()?;
        if len_bytes > hbm.capacity_bytes() {
            return None;
        }
        loop {
            match hbm.allocate(len_bytes) {
                Ok(extent) => return Some(extent),
                Err(mooncake_kv_tiers::Error::OutOfSpace { .. }) => {}
                Err(_) => return None,
            }
            if self.free_hbm(len_bytes) == 0 {
                return hbm.allocate(len_bytes).ok();
            }
        }
    }

    /// Demotes the coldest HBM blocks to DRAM until their extents add up to `target_bytes`,
    /// or nothing more can go; one the policy expects no use of (an ended chain, an unused
    /// partial block) is evicted instead. Returns the HBM bytes let go of.
    fn free_hbm(&self, target_bytes: u64) -> u64 {
        let mut freed = 0;
        let mut budget = self.residency[HBM].lock().policy.len();
        while freed < target_bytes && budget > 0 {
            budget -= 1;
            let Some((victim, has_future)) = self.residency[HBM].lock().pop_victim_judged(|_| true)
            else {
                break;
            };
            freed += self.demote_hbm(&victim, has_future);
        }
        freed
    }

    /// Moves a block's HBM copy down: into DRAM unless it has a copy below already or has no
    /// future, then drops it. Returns the HBM bytes let go of.
    fn demote_hbm(&self, victim: &Arc<Slot>, has_future: bool) -> u64 {
        let Some(copy) = victim.hbm() else { return 0 };
        if has_future && self.copy_down(victim) {
            self.counters.demotions.fetch_add(1, Ordering::Relaxed);
        }
        drop(copy);
        let shard = self.index.shard(victim.hash).write();
        if !shard.holds(victim) {
            return 0;
        }
        let mut locations = victim.locations.write();
        let Some(copy) = locations.hbm.take() else {
            return 0;
        };
        self.evicted(HBM, victim, locations, shard);
        copy.extent_len_bytes()
    }

    /// `victim` has just lost its `tier` copy (taken out of `locations`, both locks still
    /// held): that tier's counts go, and a block with no copy left leaves the index.
    fn evicted(
        &self,
        tier: usize,
        victim: &Arc<Slot>,
        locations: RwLockWriteGuard<'_, Locations>,
        mut shard: RwLockWriteGuard<'_, ShardMap>,
    ) {
        self.account(tier, victim, false);
        self.counters.tiers[tier]
            .evictions
            .fetch_add(1, Ordering::Relaxed);
        if locations.dram.is_none() && locations.nvme.is_none() && locations.hbm.is_none() {
            drop(locations);
            shard.remove_if(victim.hash, &victim.key, |_| true);
            drop(shard);
            self.forget_residency(victim);
        }
    }

    /// Gives a block that is only in HBM a DRAM copy (making room there), so it can be pinned,
    /// persisted or demoted. Whether a copy was made.
    fn copy_down(&self, slot: &Arc<Slot>) -> bool {
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
        let mut block = vec![0u8; copy.block_len as usize];
        if let Err(error) = copy.tier.read_at(copy.extent(), 0, &mut block) {
            tracing::warn!(%error, "reading a block out of HBM failed");
            return false;
        }
        match verify_block(slot, &block) {
            Ok(payload) => self.promote(slot, payload, true),
            Err(error) => {
                tracing::error!(%error, "corrupt block in HBM");
                false
            }
        }
    }

    /// Copies a block read from DRAM or NVMe into HBM when the tier promotes on hits and has
    /// room below its high watermark (promotion never demotes).
    fn promote_to_hbm(&self, slot: &Arc<Slot>, payload: &[u8]) {
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
        self.account(HBM, slot, true);
        self.residency[HBM].lock().insert(slot);
        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
    }

    /// Brings HBM usage back under its low watermark once it passes the high one.
    fn reclaim_hbm(&self) {
        let Some(hbm) = &self.hbm else { return };
        let (high, low) = self.config.hbm_watermark_bytes();
        if hbm.used_bytes() <= high || self.reclaiming_hbm.swap(true, Ordering::Acquire) {
            return;
        }
        let used = hbm.used_bytes();
        if used > low {
            self.free_hbm(used - low);
        }
        self.reclaiming_hbm.store(false, Ordering::Release);
    }

    /// Makes a written slot visible. If a concurrent put of the same key already published a
    /// later generation, that one stays and this one is dropped: puts of one key take effect
    /// in generation order.
    fn publish(&self, slot: &Arc<Slot>) {
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
        let tier = if slot.locations.read().hbm.is_some() {
            HBM
        } else {
            DRAM
        };
        self.residency[tier].lock().insert(slot);
        drop(shard);
        self.account(tier, slot, true);
        if let Some(old) = replaced {
            self.retire(old);
        }
    }

    /// Counts a block arriving on (`true`) or leaving (`false`) a tier.
    fn account(&self, tier: usize, slot: &Slot, arriving: bool) {
        let c = &self.counters.tiers[tier];
        if arriving {
            c.blocks.fetch_add(1, Ordering::Relaxed);
            c.payload_bytes
                .fetch_add(slot.payload_len.into(), Ordering::Relaxed);
        } else {
            c.blocks.fetch_sub(1, Ordering::Relaxed);
            c.payload_bytes
                .fetch_sub(slot.payload_len.into(), Ordering::Relaxed);
        }
    }

    fn forget_residency(&self, slot: &Slot) {
        for residency in &self.residency {
            residency.lock().remove(slot);
        }
    }

    /// A slot that left the index (removed, overwritten, evicted, found corrupt): its copies'
    /// counts go, and its map entry, if it has one, is deleted at the next commit.
    fn retire(&self, slot: Arc<Slot>) {
        let locations = {
            // Under meta_lock: a persist in progress has either committed and set the NVMe
            // copy (so we see it and delete its entry) or will find the slot gone from the index.
            let _meta = self.store.as_ref().map(|s| s.meta_lock.lock());
            std::mem::take(&mut *slot.locations.write())
        };
        if locations.dram.is_some() {
            self.account(DRAM, &slot, false);
        }
        if locations.hbm.is_some() {
            self.account(HBM, &slot, false);
        }
        if let Some(nvme) = locations.nvme {
            self.account(NVME, &slot, false);
            if let Some(store) = &self.store {
                store.defer_delete(&slot.key, nvme);
            }
        }
    }

    fn remove_if(&self, key: &[u8], generation: Option<u64>) -> bool {
        let hash = self.index.hash(key);
        let removed = self.index.shard(hash).write().remove_if(hash, key, |slot| {
            generation.is_none_or(|g| slot.generation == g)
        });
        let Some(slot) = removed else { return false };
        self.forget_residency(&slot);
        self.retire(slot);
        self.counters.removes.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn after_puts(&self) {
        self.reclaim_hbm();
        if self.dram.used_bytes() <= self.config.high_watermark_bytes() {
            return;
        }
        if self.store.is_some() {
            // Demotion writes to NVMe: the background reclaimer does it.
            self.wake_reclaimer();
        } else {
            self.reclaim_dram();
        }
    }

    fn wake_reclaimer(&self) {
        *self.wake.0.lock() = true;
        self.wake.1.notify_one();
    }

    fn run_reclaimer(&self) {
        while !self.stop.load(Ordering::Acquire) {
            {
                let mut woken = self.wake.0.lock();
                if !*woken {
                    self.wake.1.wait_for(&mut woken, RECLAIM_POLL);
                }
                *woken = false;
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let wanted = self.room_wanted.swap(false, Ordering::AcqRel);
            if wanted || self.dram.used_bytes() > self.config.high_watermark_bytes() {
                self.reclaim_dram();
            }
            self.reclaim_nvme();
        }
    }

    /// Brings NVMe usage back under its low watermark once it passes the high one.
    fn reclaim_nvme(&self) {
        let Some(store) = &self.store else { return };
        let used = store.tier.used_bytes();
        if used <= self.config.nvme_high_watermark_bytes() {
            return;
        }
        if let Err(error) = self.free_nvme(used - self.config.nvme_low_watermark_bytes()) {
            tracing::warn!(%error, "evicting from NVMe failed");
        }
    }

    /// Brings DRAM usage back under the low watermark. One thread at a time; others go on.
    fn reclaim_dram(&self) {
        if self.reclaiming.swap(true, Ordering::Acquire) {
            return;
        }
        let used = self.dram.used_bytes();
        let low = self.config.low_watermark_bytes();
        if used > low {
            self.free_dram(used - low);
        }
        self.reclaiming.store(false, Ordering::Release);
    }

    /// Allocates DRAM for a block, demoting or evicting cold blocks as long as that helps.
    fn reserve_dram(&self, len_bytes: u64) -> Result<mooncake_kv_tiers::Extent> {
        let no_space = || Error::NoSpace {
            required_bytes: len_bytes,
            capacity_bytes: self.dram.capacity_bytes(),
            used_bytes: self.dram.used_bytes(),
            pinned_bytes: self.pinned_bytes(),
        };
        if len_bytes > self.dram.capacity_bytes() {
            // Evicting could never make room: refuse before throwing anything out.
            return Err(no_space());
        }
        let mut waits = 0;
        loop {
            match self.dram.allocate(len_bytes) {
                Ok(extent) => return Ok(extent),
                Err(mooncake_kv_tiers::Error::OutOfSpace { .. }) => {}
                Err(other) => return Err(other.into()),
            }
            if self.free_dram(len_bytes) > 0 {
                continue;
            }
            // Nothing left for this thread to move. Unless pinned blocks hold every used
            // byte, space held elsewhere comes back soon: victims another thread is demoting,
            // evicted copies a reader has not let go of yet, blocks other puts are writing.
            // Wait for it, boundedly.
            if waits < MAX_SPACE_WAITS
                && (self.victims_in_flight.load(Ordering::Acquire) > 0
                    || self.dram.used_bytes() > self.pinned_bytes())
            {
                waits += 1;
                std::thread::sleep(SPACE_WAIT);
                continue;
            }
            return self.dram.allocate(len_bytes).map_err(|_| no_space());
        }
    }

    fn pinned_bytes(&self) -> u64 {
        self.residency[DRAM]
            .lock()
            .resident()
            .iter()
            .filter(|s| s.is_pinned())
            .filter_map(|s| s.dram().map(|d| d.extent_len_bytes()))
            .sum()
    }

    /// Takes DRAM copies of the coldest unpinned blocks away until their extents add up to
    /// `target_bytes`, or nothing more can go. With a data directory, a block without an NVMe
    /// copy is written to NVMe first (demotion) and evicted only if that fails or the policy
    /// expects no use of it; without one, it is evicted. Returns the bytes of the DRAM extents
    /// let go of.
    fn free_dram(&self, target_bytes: u64) -> u64 {
        let mut freed = 0;
        // The policy passes over pinned blocks (they stay, as recently used) and reports when
        // nothing it holds may go. A victim pinned after it was chosen goes back, so stop once
        // as many victims as there were blocks at the start have been taken.
        let mut budget = self.residency[DRAM].lock().policy.len();
        while freed < target_bytes && budget > 0 {
            // Each victim, and whether the policy expects it to be used again: one it does not
            // (an ended chain, an unused partial block) is not worth an NVMe write, so it is
            // evicted rather than demoted.
            let mut victims: Vec<(Arc<Slot>, bool)> = Vec::with_capacity(BATCH);
            {
                // Without NVMe, take victims until their extents cover what is still needed,
                // no more: an eviction is a block that will miss later. With NVMe, at least a
                // 32nd of the tier (up to a batch): demoted blocks still hit there, and a batch
                // shares one data sync and one metadata commit.
                let mut planned = freed;
                let goal = match self.store {
                    None => target_bytes,
                    Some(_) => target_bytes.max(self.dram.capacity_bytes() / 32),
                };
                let mut residency = self.residency[DRAM].lock();
                while victims.len() < BATCH && budget > 0 && planned < goal {
                    let Some((slot, has_future)) =
                        residency.pop_victim_judged(|slot| !slot.is_pinned())
                    else {
                        budget = 0;
                        break;
                    };
                    budget -= 1;
                    planned += slot.dram().map_or(0, |copy| copy.extent_len_bytes());
                    victims.push((slot, has_future));
                }
            }
            if victims.is_empty() {
                break;
            }
            // Counted before the residency lock is released would be tighter, but a waiter
            // that misses these only reports NoSpace a little early, which is allowed.
            self.victims_in_flight
                .fetch_add(victims.len(), Ordering::AcqRel);
            if self.store.is_some() {
                let unpersisted: Vec<Arc<Slot>> = victims
                    .iter()
                    .filter(|(slot, has_future)| *has_future && slot.nvme().is_none())
                    .map(|(slot, _)| Arc::clone(slot))
                    .collect();
                if !unpersisted.is_empty() {
                    let count = unpersisted.len() as u64;
                    let failures = self
                        .persist(unpersisted)
                        .into_iter()
                        .filter(Result::is_err)
                        .count();
                    self.counters
                        .demotions
                        .fetch_add(count - failures as u64, Ordering::Relaxed);
                }
            }
            for (victim, _) in &victims {
                freed += self.drop_dram_copy(victim);
            }
            self.victims_in_flight
                .fetch_sub(victims.len(), Ordering::AcqRel);
        }
        freed
    }

    /// Drops a victim's DRAM copy: the block stays, on NVMe, if it has a copy there; otherwise
    /// it leaves the index. Returns the DRAM bytes let go of.
    fn drop_dram_copy(&self, victim: &Arc<Slot>) -> u64 {
        let shard = self.index.shard(victim.hash).write();
        let current = shard.holds(victim);
        if !current {
            // Removed or overwritten meanwhile; whoever did it has accounted for it.
            return 0;
        }
        if victim.is_pinned() {
            // Pinned after it was chosen: it stays, as recently used.
            self.residency[DRAM].lock().insert(victim);
            return 0;
        }
        let mut locations = victim.locations.write();
        let Some(copy) = locations.dram.take() else {
            return 0;
        };
        self.evicted(DRAM, victim, locations, shard);
        copy.extent_len_bytes()
    }

    /// Writes blocks that are only in DRAM to NVMe and commits their map entries, with one
    /// data sync and one metadata sync for the batch. One result per slot; a slot that already
    /// has an NVMe copy is `Ok` at once.
    fn persist(&self, slots: Vec<Arc<Slot>>) -> Vec<Result<()>> {
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
                    let mut block = vec![0u8; hbm.block_len as usize];
                    let read = hbm
                        .tier
                        .read_at(hbm.extent(), 0, &mut block)
                        .map_err(Error::from)
                        .and_then(|()| verify_block(slot, &block).map(<[u8]>::to_vec));
                    match self.checked(slot, read) {
                        Ok(payload) => Source::Host(payload),
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
            match self.reserve_nvme(len as u64) {
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
                        Source::Host(payload) => &payload[..],
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
            self.account(NVME, slot, true);
            self.residency[NVME].lock().insert(slot);
        }
        if store.tier.used_bytes() > self.config.nvme_high_watermark_bytes() {
            self.wake_reclaimer();
        }
        results
    }

    /// Allocates NVMe space, evicting the coldest NVMe copies if needed.
    fn reserve_nvme(&self, len_bytes: u64) -> Result<mooncake_kv_tiers::Extent> {
        let store = self.store.as_ref().ok_or(Error::NotPersistent)?;
        let tier = &store.tier;
        let no_space = || Error::NoSpace {
            required_bytes: len_bytes,
            capacity_bytes: tier.capacity_bytes(),
            used_bytes: tier.used_bytes(),
            pinned_bytes: 0,
        };
        if len_bytes > tier.capacity_bytes() {
            return Err(no_space());
        }
        let mut waits = 0;
        loop {
            match tier.allocate(len_bytes) {
                Ok(extent) => return Ok(extent),
                Err(mooncake_kv_tiers::Error::OutOfSpace { .. }) => {}
                Err(other) => return Err(other.into()),
            }
            // Removed and overwritten blocks hold their extents until their map deletes are
            // committed: commit them first, it frees space without evicting anything.
            if store.has_deferred_deletes() {
                let _meta = store.meta_lock.lock();
                store.commit(&[], &[])?;
                continue;
            }
            if self.free_nvme(len_bytes.max(tier.capacity_bytes() / 100))? > 0 {
                continue;
            }
            // Readers and other threads' evictions may be about to let extents go.
            if waits < MAX_SPACE_WAITS {
                waits += 1;
                std::thread::sleep(SPACE_WAIT);
                continue;
            }
            return tier.allocate(len_bytes).map_err(|_| no_space());
        }
    }

    /// Drops the NVMe copies of the coldest blocks until their extents add up to
    /// `target_bytes`. A block that has no DRAM copy leaves the index. The map deletions are
    /// committed before the extents are freed.
    fn free_nvme(&self, target_bytes: u64) -> Result<u64> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut victims = Vec::new();
        {
            let mut residency = self.residency[NVME].lock();
            let mut bytes = 0;
            while bytes < target_bytes {
                // An NVMe copy being read holds its extent until the read ends; pins are about
                // DRAM.
                let Some(slot) = residency.pop_victim(|_| true) else {
                    break;
                };
                bytes += slot.nvme().map_or(0, |c| c.entry.extent_len_bytes);
                victims.push(slot);
            }
        }
        let mut freed = 0;
        let mut dropped = Vec::new();
        let _meta = store.meta_lock.lock();
        let mut deletes = Vec::new();
        for victim in &victims {
            let mut shard = self.index.shard(victim.hash).write();
            let current = shard.holds(victim);
            if !current {
                // Retired meanwhile, which took its copies (and deferred its map delete).
                continue;
            }
            let mut locations = victim.locations.write();
            let Some(copy) = locations.nvme.take() else {
                continue;
            };
            self.account(NVME, victim, false);
            self.counters.tiers[NVME]
                .evictions
                .fetch_add(1, Ordering::Relaxed);
            if locations.dram.is_none() && locations.hbm.is_none() {
                drop(locations);
                shard.remove_if(victim.hash, &victim.key, |_| true);
                drop(shard);
                self.forget_residency(victim);
            }
            freed += copy.entry.extent_len_bytes;
            deletes.push((victim.clone(), copy.entry.generation));
            dropped.push(copy);
        }
        let delete_refs: Vec<(&[u8], u64)> =
            deletes.iter().map(|(s, g)| (&s.key[..], *g)).collect();
        store.commit(&[], &delete_refs)?;
        // `dropped` goes here: the entries are durably deleted, the extents may be reused.
        drop(dropped);
        Ok(freed)
    }

    fn flush(&self) -> Result<usize> {
        let store = self.store.as_ref().ok_or(Error::NotPersistent)?;
        store.check_poisoned()?;
        let mut pending: Vec<Arc<Slot>> = self.residency[DRAM]
            .lock()
            .resident()
            .into_iter()
            .filter(|s| s.nvme().is_none())
            .collect();
        // Blocks only in HBM too (persist gives each a DRAM copy to write from).
        let hbm_only = self.residency[HBM].lock().resident();
        pending.extend(hbm_only.into_iter().filter(|s| {
            let locations = s.locations.read();
            locations.dram.is_none() && locations.nvme.is_none()
        }));
        let mut written = 0;
        for chunk in pending.chunks(FLUSH_BATCH) {
            for result in self.persist(chunk.to_vec()) {
                result?;
                written += 1;
            }
        }
        // Commit pending removals even when nothing was written.
        let _meta = store.meta_lock.lock();
        store.commit(&[], &[])?;
        Ok(written)
    }

    /// Looks a key up for a read, counting the use.
    fn lookup(&self, key: &[u8]) -> Option<Arc<Slot>> {
        let Some(slot) = self.index.get(key) else {
            self.counters.tiers[DRAM]
                .misses
                .fetch_add(1, Ordering::Relaxed);
            if self.store.is_some() {
                self.counters.tiers[NVME]
                    .misses
                    .fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        Some(slot)
    }

    fn touch(&self, tier: usize, slot: &Slot) {
        self.residency[tier]
            .lock()
            .touch(slot.entries[tier].load(Ordering::Relaxed), slot.generation);
    }

    /// Reads a block's payload and hands it to `sink`, from DRAM in place or from NVMe through
    /// a verified buffer; promotes NVMe hits when configured.
    fn read_slot(&self, slot: &Arc<Slot>, sink: impl FnOnce(&[u8])) -> Result<SlotRead<()>> {
        let locations = slot.locations.read().clone();
        if let Some(dram) = &locations.dram {
            let payload = self.checked(slot, self.verify_dram(slot, dram))?;
            self.hit(DRAM, slot);
            if locations.hbm.is_none() {
                self.promote_to_hbm(slot, payload);
            }
            sink(payload);
            return Ok(SlotRead::Read(()));
        }
        if let Some(hbm) = &locations.hbm {
            let mut block = vec![0u8; hbm.block_len as usize];
            self.checked(
                slot,
                hbm.tier
                    .read_at(hbm.extent(), 0, &mut block)
                    .map_err(Error::from),
            )?;
            let payload = self.checked(slot, verify_block(slot, &block))?;
            self.hit(HBM, slot);
            sink(payload);
            return Ok(SlotRead::Read(()));
        }
        let Some(nvme) = &locations.nvme else {
            // Retired between the lookup and now.
            return Ok(SlotRead::Retired);
        };
        let store = self.store.as_ref().expect("an NVMe copy implies a store");
        self.counters.tiers[DRAM]
            .misses
            .fetch_add(1, Ordering::Relaxed);
        let buf = self.checked(slot, store.read_block(nvme))?;
        let payload = self.checked(slot, verify_nvme(slot, nvme, &buf))?;
        self.hit(NVME, slot);
        if self.config.promote_on_hit {
            self.promote(slot, payload, false);
        }
        self.promote_to_hbm(slot, payload);
        sink(payload);
        Ok(SlotRead::Read(()))
    }

    fn hit(&self, tier: usize, slot: &Slot) {
        self.counters.tiers[tier]
            .hits
            .fetch_add(1, Ordering::Relaxed);
        self.touch(tier, slot);
    }

    fn get_into(&self, key: &[u8], target: &mut [u8]) -> Result<Option<usize>> {
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
    fn read_current<T>(
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
    unsafe fn get_into_device(&self, key: &[u8], target: DeviceRange) -> Result<Option<usize>> {
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
                self.hit(HBM, slot);
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
    fn get_into_from_hbm(
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
        self.hit(HBM, slot);
        Ok(len)
    }

    /// Reads an NVMe-only block's header sectors into a small buffer and its payload straight
    /// into `target`, in one batch, then verifies both.
    fn get_into_direct(
        &self,
        slot: &Arc<Slot>,
        nvme: &NvmeCopy,
        target: &mut [u8],
    ) -> Result<usize> {
        let store = self.store.as_ref().expect("an NVMe copy implies a store");
        self.counters.tiers[DRAM]
            .misses
            .fetch_add(1, Ordering::Relaxed);
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
        self.hit(NVME, slot);
        if self.config.promote_on_hit {
            self.promote(slot, &target[..payload_len], false);
        }
        Ok(payload_len)
    }

    /// Copies an NVMe block into DRAM. A read hit promotes only into free space below the
    /// high watermark (`make_room` false: promotion never evicts); a pin makes room.
    fn promote(&self, slot: &Arc<Slot>, payload: &[u8], make_room: bool) -> bool {
        let len = dram_extent_len(
            format::encoded_len(slot.key.len(), payload.len(), DRAM_PAYLOAD_ALIGN),
            payload.len(),
        );
        let extent = if make_room {
            match self.reserve_dram(len) {
                Ok(extent) => extent,
                Err(_) => return false,
            }
        } else {
            if self.dram.used_bytes() + len > self.config.high_watermark_bytes() {
                // No room below the high mark: the reclaimer brings DRAM down to its low mark
                // (demoting the coldest blocks, not this hot one), so later hits find room.
                if self.store.is_some() {
                    self.room_wanted.store(true, Ordering::Release);
                    self.wake_reclaimer();
                }
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
        self.account(DRAM, slot, true);
        self.residency[DRAM].lock().insert(slot);
        if locations.hbm.is_none() {
            self.counters.promotions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Pins `slot` where it is (under its shard's read lock, as [`pin`](Self::pin) does).
    fn hold(&self, slot: Arc<Slot>) -> Held {
        let _shard = self.index.shard(slot.hash).read();
        slot.pins.fetch_add(1, Ordering::AcqRel);
        Held(slot)
    }

    fn pin(&self, key: &[u8]) -> Result<Option<PinnedBlock>> {
        // Bytes the block needs in DRAM, for the error if it never gets there.
        let mut needed_bytes = 0;
        for _ in 0..3 {
            let hash = self.index.hash(key);
            let pinned = {
                let shard = self.index.shard(hash).read();
                let Some(slot) = shard.find(hash, key) else {
                    drop(shard);
                    self.counters.tiers[DRAM]
                        .misses
                        .fetch_add(1, Ordering::Relaxed);
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
                    self.hit(DRAM, &pinned.slot);
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
                    let payload = self.checked(&slot, verify_nvme(&slot, &nvme, &buf))?;
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
            pinned_bytes: self.pinned_bytes(),
        })
    }

    /// Where `key`'s block is tracked in each tier, and its generation (to tell it from
    /// whatever reuses an entry id later). Takes and releases the key's index shard lock.
    fn residency_ids(&self, key: &[u8]) -> Option<([EntryId; TIERS], u64)> {
        let hash = self.index.hash(key);
        let shard = self.index.shard(hash).read();
        shard.find(hash, key).map(|slot| {
            (
                std::array::from_fn(|tier| slot.entries[tier].load(Ordering::Relaxed)),
                slot.generation,
            )
        })
    }

    /// The tiers this engine has: DRAM, then NVMe and HBM when configured.
    fn tiers_present(&self) -> impl Iterator<Item = usize> {
        [true, self.store.is_some(), self.hbm.is_some()]
            .into_iter()
            .enumerate()
            .filter_map(|(tier, present)| present.then_some(tier))
    }

    fn prefix_match(&self, keys: &[&[u8]]) -> usize {
        let mut matched: Vec<([EntryId; TIERS], u64)> = Vec::with_capacity(keys.len());
        matched.extend(keys.iter().map_while(|key| self.residency_ids(key)));
        self.touch_all(&matched);
        matched.len()
    }

    fn touch_keys(&self, keys: &[&[u8]]) -> usize {
        let held: Vec<([EntryId; TIERS], u64)> = keys
            .iter()
            .filter_map(|key| self.residency_ids(key))
            .collect();
        self.touch_all(&held);
        held.len()
    }

    /// Counts a use of each block (entry ids per tier and generation) in every tier.
    fn touch_all(&self, blocks: &[([EntryId; TIERS], u64)]) {
        if blocks.is_empty() {
            return;
        }
        for tier in self.tiers_present() {
            let mut residency = self.residency[tier].lock();
            for &(ids, generation) in blocks {
                residency.touch(ids[tier], generation);
            }
        }
    }

    fn end_chain(&self, keys: &[&[u8]]) -> bool {
        let chain: Vec<([EntryId; TIERS], u64)> = keys
            .iter()
            .filter_map(|key| self.residency_ids(key))
            .collect();
        if chain.is_empty() {
            return false;
        }
        let mut held = false;
        for tier in self.tiers_present() {
            held |= self.residency[tier].lock().chain_ended(&chain);
        }
        held
    }

    /// Passes a result through; on a verification failure, reports the block, counts it and
    /// drops it (index and map), so it is never served.
    fn checked<T>(&self, slot: &Arc<Slot>, result: Result<T>) -> Result<T> {
        let error = match result {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let corrupt = !matches!(error, Error::Tier(mooncake_kv_tiers::Error::Io { .. }));
        if corrupt {
            tracing::error!(%error, generation = slot.generation, key = ?String::from_utf8_lossy(&slot.key), "corrupt block; dropping it");
            self.counters.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
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

    /// Checks a DRAM copy's header against what the slot says it holds and returns the
    /// payload in place.
    fn verify_dram<'a>(&self, slot: &Slot, copy: &'a DramCopy) -> Result<&'a [u8]> {
        let bytes = copy.bytes();
        let header = format::decode_header(bytes)?;
        let mismatch = |detail| Error::BlockMismatch {
            expected_generation: slot.generation,
            found_generation: header.generation,
            detail,
        };
        if header.generation != slot.generation {
            return Err(mismatch("generation"));
        }
        if header.payload_offset != copy.payload_offset || header.payload_len != slot.payload_len {
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
            check_payload(payload, header.payload_crc32)?;
        }
        Ok(payload)
    }

    fn recover(&self) -> Result<()> {
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
                self.counters.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, key = ?String::from_utf8_lossy(key), "dropping a bad map entry");
            },
        )?;
        for slot in &slots {
            self.index.shard(slot.hash).write().insert(Arc::clone(slot));
            self.account(NVME, slot, true);
        }
        let mut residency = self.residency[NVME].lock();
        for slot in &slots {
            residency.insert(slot);
        }
        self.next_generation
            .store(max_generation + 1, Ordering::Relaxed);
        self.first_new_generation
            .store(max_generation + 1, Ordering::Relaxed);
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        let c = &self.counters;
        let tier = |kind, usage: mooncake_kv_tiers::TierUsage, t: usize| TierStats {
            kind,
            capacity_bytes: usage.capacity_bytes,
            used_bytes: usage.used_bytes,
            largest_free_bytes: usage.largest_free_bytes,
            free_extents: usage.free_extents,
            blocks: c.tiers[t].blocks.load(Ordering::Relaxed),
            payload_bytes: c.tiers[t].payload_bytes.load(Ordering::Relaxed),
            hits: c.tiers[t].hits.load(Ordering::Relaxed),
            misses: c.tiers[t].misses.load(Ordering::Relaxed),
            evictions: c.tiers[t].evictions.load(Ordering::Relaxed),
        };
        // Fastest first, as the field promises.
        let mut tiers = Vec::with_capacity(TIERS);
        if let Some(hbm) = &self.hbm {
            tiers.push(tier(TierKind::Hbm, hbm.usage(), HBM));
        }
        tiers.push(tier(TierKind::Dram, self.dram.usage(), DRAM));
        if let Some(store) = &self.store {
            tiers.push(tier(TierKind::Nvme, store.tier.usage(), NVME));
        }
        EngineStats {
            tiers,
            puts: c.puts.load(Ordering::Relaxed),
            removes: c.removes.load(Ordering::Relaxed),
            demotions: c.demotions.load(Ordering::Relaxed),
            promotions: c.promotions.load(Ordering::Relaxed),
            corrupt_blocks: c.corrupt_blocks.load(Ordering::Relaxed),
            huge_pages: self.dram.huge_page_mode(),
            nvme_io_backend: self.store.as_ref().map(|s| s.tier.io_backend_name()),
            nvme_io_fell_back: self.store.as_ref().is_some_and(|s| s.tier.fell_back()),
        }
    }
}

/// Where a block being persisted is written from.
enum Source {
    /// Its DRAM copy, in place.
    Dram(Arc<DramCopy>),
    /// Its payload, read out of HBM and verified.
    Host(Vec<u8>),
}

/// Checks a payload against the CRC its header records.
fn check_payload(payload: &[u8], expected: u32) -> Result<()> {
    check_crc(crc32fast::hash(payload), expected)
}

/// A payload whose checksum came to `actual`, against the `expected` one of its header.
fn check_crc(actual: u32, expected: u32) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::from(FormatError::PayloadChecksum {
            expected,
            actual,
        }))
    }
}

/// Checks the header and key of a block (its first `payload_offset` bytes) against its slot.
fn check_head(slot: &Slot, head: &[u8], payload_offset: u32) -> Result<()> {
    let header = format::decode_header(head)?;
    let mismatch = |detail| Error::BlockMismatch {
        expected_generation: slot.generation,
        found_generation: header.generation,
        detail,
    };
    if header.generation != slot.generation {
        return Err(mismatch("generation"));
    }
    if header.payload_offset != payload_offset || header.payload_len != slot.payload_len {
        return Err(mismatch("payload position"));
    }
    let key_end = HEADER_BYTES + usize::from(header.key_len);
    if head.get(HEADER_BYTES..key_end) != Some(&slot.key[..]) {
        return Err(mismatch("key"));
    }
    if crc32fast::hash(&slot.key) != header.key_crc32 {
        return Err(Error::from(FormatError::KeyChecksum {
            expected: header.key_crc32,
            actual: crc32fast::hash(&slot.key),
        }));
    }
    Ok(())
}

/// Verifies a whole block read from HBM against its slot (every checksum, and its identity)
/// and returns the payload.
fn verify_block<'a>(slot: &Slot, bytes: &'a [u8]) -> Result<&'a [u8]> {
    let block = format::decode(bytes)?;
    let mismatch = |detail| Error::BlockMismatch {
        expected_generation: slot.generation,
        found_generation: block.header.generation,
        detail,
    };
    if block.header.generation != slot.generation {
        return Err(mismatch("generation"));
    }
    if block.key != &slot.key[..] {
        return Err(mismatch("key"));
    }
    if block.header.payload_len != slot.payload_len {
        return Err(mismatch("payload length"));
    }
    Ok(block.payload)
}

/// The GPU an HBM tier lives on.
#[cfg(feature = "cuda")]
fn open_gpu(ordinal: usize) -> Result<Arc<dyn DeviceMemory>> {
    Ok(Arc::new(mooncake_kv_tiers::CudaDevice::open(ordinal)?))
}

/// Without the `cuda` feature there is no GPU to open.
#[cfg(not(feature = "cuda"))]
fn open_gpu(_ordinal: usize) -> Result<Arc<dyn DeviceMemory>> {
    Err(Error::Config {
        field: "hbm",
        reason: "this build has no GPU support: build with the `cuda` feature for an HBM tier"
            .into(),
    })
}

/// Verifies a whole block read from NVMe against its slot and returns the payload.
fn verify_nvme<'a>(slot: &Slot, copy: &NvmeCopy, buf: &'a [u8]) -> Result<&'a [u8]> {
    let block = format::decode(buf)?;
    check_identity(slot, &copy.entry, &block.header, block.key)?;
    Ok(block.payload)
}

/// Verifies the header sectors of a block read from NVMe (header, key, padding).
fn verify_nvme_head(slot: &Slot, entry: &crate::meta::MapEntry, head: &[u8]) -> Result<()> {
    let header = format::decode_header(head)?;
    let key_end = HEADER_BYTES + usize::from(header.key_len);
    let key = head
        .get(HEADER_BYTES..key_end)
        .ok_or(Error::from(FormatError::Truncated {
            needed_bytes: key_end as u64,
            available_bytes: head.len() as u64,
        }))?;
    let key_crc = crc32fast::hash(key);
    if key_crc != header.key_crc32 {
        return Err(Error::from(FormatError::KeyChecksum {
            expected: header.key_crc32,
            actual: key_crc,
        }));
    }
    if let Some(at) = head[key_end..].iter().position(|&b| b != 0) {
        return Err(Error::from(FormatError::NonZeroPadding {
            offset: key_end + at,
        }));
    }
    check_identity(slot, entry, &header, key)
}

fn check_identity(
    slot: &Slot,
    entry: &crate::meta::MapEntry,
    header: &format::Header,
    key: &[u8],
) -> Result<()> {
    let mismatch = |detail| Error::BlockMismatch {
        expected_generation: slot.generation,
        found_generation: header.generation,
        detail,
    };
    if header.generation != slot.generation {
        return Err(mismatch("generation"));
    }
    if key != &slot.key[..] {
        return Err(mismatch("key"));
    }
    if header.payload_len != entry.payload_len
        || header.payload_offset != entry.payload_offset
        || header.payload_crc32 != entry.payload_crc32
    {
        return Err(mismatch("map entry"));
    }
    Ok(())
}
