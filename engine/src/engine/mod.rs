//! The public handle: [`Engine`], how it opens and closes, and its API, each call handed to
//! the role that does it.
//!
//! | file | its one job |
//! |---|---|
//! | `write.rs` | the write path: reserving, sealing and publishing blocks; removal |
//! | `read.rs` | the read path: lookups and verified reads from each tier |
//! | `pin.rs` | pins: a block held in DRAM while a caller reads it in place |
//! | `chains.rs` | prefix chains: links for eviction, prefix matches, ended chains |
//! | `residency.rs` | which blocks each tier holds, in its policy's order, and their counts |
//! | `reclaim.rs` | making room: one reserve, free and reclaim for every tier; the reclaimer thread |
//! | `promote.rs` | moving blocks up the tiers on hits |
//! | `flusher.rs` | persistence: writing blocks to NVMe and committing their map entries |
//! | `recover.rs` | serving a data directory's blocks again at open |
//! | `stats.rs` | counters and the figures `stats` reports |
//! | `verify.rs` | checking what a tier returns against the block the index expects |
//!
//! The lock order is in the crate doc.

mod chains;
mod flusher;
mod pin;
mod promote;
mod read;
mod reclaim;
mod recover;
mod residency;
mod stats;
#[cfg(test)]
mod tests;
mod verify;
mod write;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mooncake_kv_tiers::{DeviceMemory, DeviceRange, DramConfig, DramTier, HbmConfig, HbmTier};
use parking_lot::Mutex;

use crate::index::Index;
use crate::meta::{MetaStore, MetadataStore};
use crate::slot::{LEVELS, Level, Lineage, Slot};
use crate::store::{Store, StoreConfig};
use crate::{EngineConfig, Error, Result};

pub use chains::{ChainEnd, ChainPut};
pub use pin::PinnedBlock;
pub use stats::{EngineStats, TierStats};
pub use write::Reservation;

use pin::Held;
use read::SlotRead;
use reclaim::{ReclaimState, Reclaimer};
use residency::Residency;
use stats::Counters;

/// Makes the engine's metadata store of the data directory's RocksDB.
type WrapMeta = Box<dyn FnOnce(MetaStore) -> Box<dyn MetadataStore>>;

/// Payloads in DRAM start on a cache line, so copies out of the tier run at full speed.
const DRAM_PAYLOAD_ALIGN: usize = 64;

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

/// An embeddable, thread-safe KVCache block store.
///
/// Share it between threads with `Arc<Engine>`; every method takes `&self`. Dropping it stops
/// the background reclaimer and closes the data directory; blocks only in DRAM are gone.
pub struct Engine {
    inner: Arc<Inner>,
    /// The background thread that demotes to NVMe; only with a data directory.
    reclaimer: Option<Reclaimer>,
}

/// What every role works on: the tiers, the index, each tier's residency and the counters.
struct Inner {
    config: EngineConfig,
    dram: Arc<DramTier>,
    /// The GPU memory tier above DRAM, if configured.
    hbm: Option<Arc<HbmTier>>,
    store: Option<Store>,
    index: Index,
    /// Per level ([`Level::index`]): the blocks the tier holds, in eviction order.
    residency: [Mutex<Residency>; LEVELS],
    next_generation: AtomicU64,
    /// Generations below this were recovered from the data directory at open.
    first_new_generation: AtomicU64,
    /// Who is making room where, and the reclaimer's wake-up.
    reclaim: ReclaimState,
    counters: Counters,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<PinnedBlock>();
};

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Stopping the reclaimer reports a panic of it rather than losing it.
        if let Some(mut reclaimer) = self.reclaimer.take() {
            reclaimer.stop();
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
        Self::open_inner(config, device, Box::new(|meta| Box::new(meta)))
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
        Self::open_inner(config, Some(device), Box::new(|meta| Box::new(meta)))
    }

    /// [`open`](Self::open) with the metadata store `wrap_meta` makes of the data directory's
    /// RocksDB: for tests that make it fail.
    #[cfg(test)]
    fn open_with_metadata(config: EngineConfig, wrap_meta: WrapMeta) -> Result<Self> {
        config.validate()?;
        Self::open_inner(config, None, wrap_meta)
    }

    fn open_inner(
        config: EngineConfig,
        device: Option<Arc<dyn DeviceMemory>>,
        wrap_meta: WrapMeta,
    ) -> Result<Self> {
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
            Some(dir) => Some(Store::open(
                &StoreConfig {
                    dir: dir.clone(),
                    nvme_capacity_bytes: config.nvme_capacity_bytes,
                    io_backend: config.nvme_io_backend,
                    io_depth: config.nvme_io_depth,
                },
                wrap_meta,
            )?),
        };
        let inner = Arc::new(Inner {
            index: Index::new(config.index_shards, config.index_hash_seed),
            residency: Level::ALL.map(|level| Mutex::new(Residency::new(level, &config))),
            dram: Arc::new(dram),
            hbm,
            store,
            next_generation: AtomicU64::new(1),
            first_new_generation: AtomicU64::new(1),
            reclaim: ReclaimState::default(),
            counters: Counters::default(),
            config,
        });
        inner.recover()?;
        let reclaimer = match inner.store {
            Some(_) => Some(Reclaimer::start(&inner)?),
            None => None,
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
        self.inner.reserve_block(key, payload_len)
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
    /// [`EvictionPolicyKind::Adaptive`](crate::EvictionPolicyKind::Adaptive) (the default) and
    /// [`EvictionPolicyKind::PrefixAware`](crate::EvictionPolicyKind::PrefixAware), a block is
    /// not evicted while a block put after it is resident, since `prefix_match` could not reach that one without it. They
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
    /// the first key without one. Not a use of the blocks, for eviction: the reads that follow
    /// count one each (a reader that reads one-sidedly reports them with
    /// [`touch`](Self::touch)), so a request's hits count once, not twice.
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
    /// links of [`put_chain`](Self::put_chain): in each tier, the adaptive and prefix-aware
    /// policies let the chain's blocks go before all others, tail first, from the deepest
    /// block the tier holds up to the first one another resident chain goes through (a head
    /// shared with other conversations, such as a system prompt, keeps its place). LRU and S3-FIFO ignore it.
    /// A block used afterwards is ranked as any other, so a wrong hint costs at most a miss.
    /// Keys without a block are skipped; returns whether any tier held a block of the chain.
    ///
    /// On the production conversation trace, a caller that says this for every conversation
    /// it ends lifts the prefix-aware policy's prefix hits from 13.7 / 21.7 / 29.6% to 21.3 / 33.8
    /// / 36.2% at 2 / 5 / 10% capacity (`kvctl replay --end-hints`).
    pub fn end_chain(&self, keys: &[&[u8]]) -> bool {
        self.inner.end_chain(keys)
    }

    /// Removes the block of `key`; returns whether there was one. A reader that already holds
    /// the block (a pin, a copy in progress) finishes with the old bytes; the space is freed
    /// when it lets go. On NVMe, the map entry is deleted at the next commit (a flush, a
    /// write-through put, a demotion, [`commit_removals`](Self::commit_removals), closing the
    /// engine): a crash before that brings the block back.
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

    /// Makes the removals so far durable: commits them to the data directory's map, so that
    /// a crash no longer brings their blocks back. Nothing to do without a data directory.
    ///
    /// # Errors
    ///
    /// Metadata errors (after which the engine is poisoned), or an engine poisoned before.
    pub fn commit_removals(&self) -> Result<()> {
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        store.check_poisoned()?;
        let _meta = store.meta_lock.lock();
        store.commit(&[], &[])
    }

    /// [`remove`](Self::remove) for many keys, in order.
    pub fn remove_batch(&self, keys: &[&[u8]]) -> Vec<bool> {
        keys.iter().map(|key| self.remove(key)).collect()
    }

    /// [`remove`](Self::remove)s every block the engine holds (an administrator's reset);
    /// returns how many. Blocks put meanwhile may stay.
    pub fn remove_all(&self) -> u64 {
        let keys = self.keys();
        keys.iter().filter(|key| self.remove(key)).count() as u64
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
