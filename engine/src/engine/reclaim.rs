//! Making room, written once for every tier: [`reserve`](Inner::reserve) allocates on a level,
//! [`free`](Inner::free) lets go of the coldest blocks there, [`reclaim`](Inner::reclaim)
//! brings a level from its high watermark down to its low one. What a level does with a victim
//! is its own: HBM demotes it into DRAM, DRAM writes it to NVMe (a batch at a time) or evicts
//! it, NVMe evicts it and commits the map deletes. And the [`Reclaimer`]: the background
//! thread that does DRAM's and NVMe's reclaiming when there is a data directory, so that puts
//! never wait for an NVMe write.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use mooncake_kv_tiers::{Error as TierError, Extent, Tier};
use parking_lot::{Condvar, Mutex, RwLockWriteGuard};

use super::Inner;
use crate::index::ShardMap;
use crate::slot::{LEVELS, Level, Locations, Slot};
use crate::{Error, Result};

/// Victims taken from a policy per lock acquisition, and blocks demoted per batch.
const BATCH: usize = 32;
/// How often the background reclaimer looks at DRAM usage when nobody wakes it.
const RECLAIM_POLL: Duration = Duration::from_millis(50);
/// A put that finds a tier full of blocks it cannot move, while other threads or readers
/// hold space that is on its way back, waits at most this many times this long before it
/// reports `NoSpace`: 2 s in all, never forever.
const MAX_SPACE_WAITS: u32 = 2000;
const SPACE_WAIT: Duration = Duration::from_millis(1);

/// Who is making room where, and how the reclaimer is woken.
#[derive(Debug, Default)]
pub(super) struct ReclaimState {
    /// Per level: set while one thread brings it back under its low watermark.
    reclaiming: [AtomicBool; LEVELS],
    /// A promotion found no room below DRAM's high watermark: the reclaimer should bring DRAM
    /// down to its low mark even though usage has not passed the high one.
    room_wanted: AtomicBool,
    /// DRAM victims taken from the policy and not yet dealt with: space another thread is
    /// about to free.
    victims_in_flight: AtomicUsize,
    /// Set (under its lock) to wake the reclaimer before its next poll.
    woken: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Victims being dealt with, counted while this lives, so that the count comes down even if
/// dealing with them panics.
struct InFlight<'a>(&'a AtomicUsize, usize);

impl<'a> InFlight<'a> {
    fn count(victims_in_flight: &'a AtomicUsize, n: usize) -> Self {
        victims_in_flight.fetch_add(n, Ordering::AcqRel);
        Self(victims_in_flight, n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// A level's "one thread reclaims it" flag, held while this lives (a panic lets it go too).
struct Reclaiming<'a>(&'a AtomicBool);

impl<'a> Reclaiming<'a> {
    /// The flag, unless another thread holds it.
    fn claim(flag: &'a AtomicBool) -> Option<Self> {
        (!flag.swap(true, Ordering::Acquire)).then_some(Self(flag))
    }
}

impl Drop for Reclaiming<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The background reclaimer: one thread, started with a data directory, that demotes DRAM's
/// coldest blocks to NVMe when DRAM passes its high watermark (or a promotion wants room) and
/// evicts from NVMe when it passes its own. Stopping it joins the thread; a panic in it poisons
/// the engine (nothing more is persisted, [`Error::Poisoned`]) and is logged, not lost.
pub(super) struct Reclaimer {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Reclaimer {
    pub(super) fn start(inner: &Arc<Inner>) -> Result<Self> {
        let background = Arc::clone(inner);
        let thread = std::thread::Builder::new()
            .name("mooncake-reclaimer".into())
            .spawn(move || {
                let run = std::panic::catch_unwind(AssertUnwindSafe(|| background.run_reclaimer()));
                if let Err(panic) = run {
                    background.reclaimer_panicked(panic_message(&*panic));
                }
            })
            .map_err(|source| Error::DataDir {
                path: PathBuf::new(),
                action: "start the reclaimer thread",
                source,
            })?;
        Ok(Self {
            inner: Arc::clone(inner),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub(super) fn stop(&mut self) {
        self.inner.reclaim.stop.store(true, Ordering::Release);
        self.inner.wake_reclaimer();
        if let Some(thread) = self.thread.take() {
            // The thread catches its own panics, so this is a panic while reporting one.
            if let Err(panic) = thread.join() {
                tracing::error!(panic = panic_message(&*panic), "the reclaimer thread died");
            }
        }
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a panic said, if it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

impl Inner {
    /// Allocates `len_bytes` on `level`, letting go of its coldest blocks as long as that
    /// helps, and waiting (boundedly) for space other threads are about to return.
    ///
    /// # Errors
    ///
    /// [`Error::NoSpace`] when the block cannot fit even so; [`Error::NotPersistent`] for NVMe
    /// without a data directory, [`Error::Config`] for HBM without the tier; tier and metadata
    /// errors.
    pub(super) fn reserve(&self, level: Level, len_bytes: u64) -> Result<Extent> {
        let tier = self.medium(level).ok_or_else(|| match level {
            Level::Nvme => Error::NotPersistent,
            _ => Error::Config {
                field: "hbm",
                reason: "the engine has no HBM tier".into(),
            },
        })?;
        let no_space = || Error::NoSpace {
            required_bytes: len_bytes,
            capacity_bytes: tier.capacity_bytes(),
            used_bytes: tier.used_bytes(),
            pinned_bytes: self.pinned_bytes(level),
        };
        if len_bytes > tier.capacity_bytes() {
            // Evicting could never make room: refuse before throwing anything out.
            return Err(no_space());
        }
        let mut waits = 0;
        loop {
            match tier.allocate(len_bytes) {
                Ok(extent) => return Ok(extent),
                Err(TierError::OutOfSpace { .. }) => {}
                Err(other) => return Err(other.into()),
            }
            if self.make_room(level, len_bytes)? {
                continue;
            }
            if waits < MAX_SPACE_WAITS && self.space_coming_back(level) {
                waits += 1;
                std::thread::sleep(SPACE_WAIT);
                continue;
            }
            return tier.allocate(len_bytes).map_err(|_| no_space());
        }
    }

    /// One step of making room for `len_bytes` on `level`; whether it freed anything.
    fn make_room(&self, level: Level, len_bytes: u64) -> Result<bool> {
        if let (Level::Nvme, Some(store)) = (level, &self.store) {
            // Removed and overwritten blocks hold their extents until their map deletes are
            // committed: commit them first, it frees space without evicting anything.
            if store.has_deferred_deletes() {
                let _meta = store.meta_lock.lock();
                store.commit(&[], &[])?;
                return Ok(true);
            }
            // Evict at least a hundredth of the tier: each eviction commits the map.
            let at_least = store.tier.capacity_bytes() / 100;
            return Ok(self.free(level, len_bytes.max(at_least))? > 0);
        }
        Ok(self.free(level, len_bytes)? > 0)
    }

    /// Whether space on `level` that nothing here can free is held by someone who will let
    /// it go soon, so that a reservation is worth waiting for.
    fn space_coming_back(&self, level: Level) -> bool {
        match level {
            // HBM reservations fall back to DRAM at once.
            Level::Hbm => false,
            // Unless pinned blocks hold every used byte, space held elsewhere comes back soon:
            // victims another thread is demoting, evicted copies a reader has not let go of
            // yet, blocks other puts are writing.
            Level::Dram => {
                self.reclaim.victims_in_flight.load(Ordering::Acquire) > 0
                    || self.dram.used_bytes() > self.pinned_bytes(Level::Dram)
            }
            // Readers and other threads' evictions may be about to let extents go.
            Level::Nvme => true,
        }
    }

    /// Lets go of the coldest blocks on `level` until their extents add up to `target_bytes`,
    /// or nothing more can go; returns the bytes let go of. What going means is the level's:
    /// see [`let_go`](Self::let_go).
    ///
    /// # Errors
    ///
    /// NVMe's: committing the map deletes failed (the engine is then poisoned).
    pub(super) fn free(&self, level: Level, target_bytes: u64) -> Result<u64> {
        let (batch, goal) = match (level, &self.store) {
            // One at a time: each demotion makes room in DRAM for the block it moves.
            (Level::Hbm, _) => (1, target_bytes),
            // Without NVMe, victims until their extents cover what is still needed, no more:
            // an eviction is a block that will miss later. With NVMe, at least a 32nd of the
            // tier (up to a batch): demoted blocks still hit there, and a batch shares one data
            // sync and one metadata commit.
            (Level::Dram, None) => (BATCH, target_bytes),
            (Level::Dram, Some(_)) => (BATCH, target_bytes.max(self.dram.capacity_bytes() / 32)),
            // All at once: the deletes share one commit.
            (Level::Nvme, _) => (usize::MAX, target_bytes),
        };
        let mut freed = 0;
        // The policy passes over pinned blocks (they stay, as recently used) and reports when
        // nothing it holds may go. A victim pinned after it was chosen goes back, so stop once
        // as many victims as there were blocks at the start have been taken.
        let mut budget = self.residency(level).policy.len();
        while freed < target_bytes && budget > 0 {
            // Each victim, and whether the policy expects it to be used again: one it does not
            // (an ended chain, an unused partial block) is not worth a copy below.
            let mut victims: Vec<(Arc<Slot>, bool)> = Vec::new();
            {
                let mut planned = freed;
                let mut residency = self.residency(level);
                while victims.len() < batch && budget > 0 && planned < goal {
                    // Pins hold DRAM copies; an HBM or NVMe copy being read holds its extent
                    // until the read ends.
                    let evictable = |slot: &Slot| level != Level::Dram || !slot.is_pinned();
                    let Some((slot, has_future)) = residency.pop_victim(evictable) else {
                        budget = 0;
                        break;
                    };
                    budget -= 1;
                    planned += slot.extent_len_bytes(level);
                    victims.push((slot, has_future));
                }
            }
            if victims.is_empty() {
                break;
            }
            freed += self.let_go(level, &victims)?;
        }
        Ok(freed)
    }

    /// Takes victims' copies off `level`; returns the bytes of the extents let go of.
    /// - HBM: each goes down into DRAM (unless it has a copy below already, or no future).
    /// - DRAM: with a data directory, those without an NVMe copy are written to NVMe first
    ///   (demotion), unless the policy expects no use of them; then the DRAM copies go.
    /// - NVMe: the copies go and their map entries are deleted in one commit, before their
    ///   extents can be reused.
    fn let_go(&self, level: Level, victims: &[(Arc<Slot>, bool)]) -> Result<u64> {
        match level {
            Level::Hbm => Ok(victims
                .iter()
                .map(|(victim, has_future)| self.demote_hbm(victim, *has_future))
                .sum()),
            Level::Dram => {
                // Counted before the residency lock is released would be tighter, but a waiter
                // that misses these only reports NoSpace a little early, which is allowed.
                // Counted before the residency lock is released would be tighter, but a waiter
                // that misses these only reports NoSpace a little early, which is allowed.
                let _in_flight = InFlight::count(&self.reclaim.victims_in_flight, victims.len());
                self.demote_dram(victims);
                Ok(victims
                    .iter()
                    .map(|(victim, _)| self.drop_copy(Level::Dram, victim))
                    .sum())
            }
            Level::Nvme => self.evict_nvme(victims),
        }
    }

    /// Moves a block's HBM copy down: into DRAM unless it has a copy below already or has no
    /// future, then drops it. Returns the HBM bytes let go of.
    fn demote_hbm(&self, victim: &Arc<Slot>, has_future: bool) -> u64 {
        let Some(copy) = victim.hbm() else { return 0 };
        if has_future && self.copy_down(victim) {
            self.counters.demotions(1);
        }
        drop(copy);
        self.drop_copy(Level::Hbm, victim)
    }

    /// With a data directory, writes the DRAM victims the policy expects a use of and that
    /// have no NVMe copy yet to NVMe, in one batch.
    fn demote_dram(&self, victims: &[(Arc<Slot>, bool)]) {
        if self.store.is_none() {
            return;
        }
        let unpersisted: Vec<Arc<Slot>> = victims
            .iter()
            .filter(|(slot, has_future)| *has_future && slot.nvme().is_none())
            .map(|(slot, _)| Arc::clone(slot))
            .collect();
        if unpersisted.is_empty() {
            return;
        }
        let count = unpersisted.len() as u64;
        let failures = self
            .persist(unpersisted)
            .into_iter()
            .filter(Result::is_err)
            .count();
        self.counters.demotions(count - failures as u64);
    }

    /// Drops a victim's copy on `level` (HBM or DRAM): the block stays where it has another
    /// copy; otherwise it leaves the index. A DRAM victim pinned since it was chosen stays.
    /// Returns the bytes let go of.
    fn drop_copy(&self, level: Level, victim: &Arc<Slot>) -> u64 {
        let shard = self.index.shard(victim.hash).write();
        if !shard.holds(victim) {
            // Removed or overwritten meanwhile; whoever did it has accounted for it.
            return 0;
        }
        if level == Level::Dram && victim.is_pinned() {
            // Pinned after it was chosen: it stays, as recently used.
            self.residency(Level::Dram).insert(victim);
            return 0;
        }
        let mut locations = victim.locations.write();
        let freed = match level {
            Level::Hbm => locations.hbm.take().map(|copy| copy.extent_len_bytes()),
            Level::Dram => locations.dram.take().map(|copy| copy.extent_len_bytes()),
            Level::Nvme => unreachable!("NVMe copies go through evict_nvme"),
        };
        let Some(freed) = freed else { return 0 };
        self.evicted(level, victim, locations, shard);
        freed
    }

    /// Drops NVMe victims' copies; a block with no copy left leaves the index. The map
    /// deletions are committed before the extents are freed.
    fn evict_nvme(&self, victims: &[(Arc<Slot>, bool)]) -> Result<u64> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut freed = 0;
        let mut dropped = Vec::new();
        let _meta = store.meta_lock.lock();
        let mut deletes = Vec::new();
        for (victim, _) in victims {
            let shard = self.index.shard(victim.hash).write();
            if !shard.holds(victim) {
                // Retired meanwhile, which took its copies (and deferred its map delete).
                continue;
            }
            let mut locations = victim.locations.write();
            let Some(copy) = locations.nvme.take() else {
                continue;
            };
            self.evicted(Level::Nvme, victim, locations, shard);
            freed += copy.entry.extent_len_bytes;
            deletes.push((&victim.key[..], copy.entry.generation));
            dropped.push(copy);
        }
        store.commit(&[], &deletes)?;
        // `dropped` goes here: the entries are durably deleted, the extents may be reused.
        drop(dropped);
        Ok(freed)
    }

    /// `victim` has just lost its copy on `level` (taken out of `locations`, both locks still
    /// held): that level's counts go, and a block with no copy left leaves the index.
    fn evicted(
        &self,
        level: Level,
        victim: &Arc<Slot>,
        locations: RwLockWriteGuard<'_, Locations>,
        mut shard: RwLockWriteGuard<'_, ShardMap>,
    ) {
        self.account(level, victim, false);
        self.counters.tier(level).eviction();
        if !locations.any() {
            drop(locations);
            shard.remove_if(victim.hash, &victim.key, |_| true);
            drop(shard);
            self.forget_residency(victim);
        }
    }

    /// Brings `level` back under its low watermark once it passes the high one, or (`force`)
    /// whenever it is above the low one. One thread per level at a time; others go on.
    pub(super) fn reclaim(&self, level: Level, force: bool) {
        let Some(tier) = self.medium(level) else {
            return;
        };
        let (high, low) = self.watermark_bytes(level);
        if !force && tier.used_bytes() <= high {
            return;
        }
        let Some(_reclaiming) = Reclaiming::claim(&self.reclaim.reclaiming[level.index()]) else {
            return;
        };
        let used = tier.used_bytes();
        if used > low {
            if let Err(error) = self.free(level, used - low) {
                tracing::warn!(%error, tier = %level.kind(), "making room failed");
            }
        }
    }

    /// The high and low watermarks of `level`, in bytes.
    fn watermark_bytes(&self, level: Level) -> (u64, u64) {
        match level {
            Level::Hbm => self.config.hbm_watermark_bytes(),
            Level::Dram => (
                self.config.high_watermark_bytes(),
                self.config.low_watermark_bytes(),
            ),
            Level::Nvme => (
                self.config.nvme_high_watermark_bytes(),
                self.config.nvme_low_watermark_bytes(),
            ),
        }
    }

    /// After puts: HBM makes room at once (its demotions are memory copies); DRAM does too
    /// without a data directory, and otherwise wakes the reclaimer, which writes to NVMe.
    pub(super) fn after_puts(&self) {
        self.reclaim(Level::Hbm, false);
        if self.dram.used_bytes() <= self.config.high_watermark_bytes() {
            return;
        }
        if self.store.is_some() {
            self.wake_reclaimer();
        } else {
            self.reclaim(Level::Dram, false);
        }
    }

    /// Asks the reclaimer to bring DRAM down to its low watermark even though it has not
    /// passed the high one (a promotion found no room).
    pub(super) fn want_room(&self) {
        if self.store.is_some() {
            self.reclaim.room_wanted.store(true, Ordering::Release);
            self.wake_reclaimer();
        }
    }

    pub(super) fn wake_reclaimer(&self) {
        *self.reclaim.woken.lock() = true;
        self.reclaim.wake.notify_one();
    }

    fn run_reclaimer(&self) {
        let state = &self.reclaim;
        while !state.stop.load(Ordering::Acquire) {
            {
                let mut woken = state.woken.lock();
                if !*woken {
                    state.wake.wait_for(&mut woken, RECLAIM_POLL);
                }
                *woken = false;
            }
            if state.stop.load(Ordering::Acquire) {
                break;
            }
            let wanted = state.room_wanted.swap(false, Ordering::AcqRel);
            self.reclaim(Level::Dram, wanted);
            self.reclaim(Level::Nvme, false);
        }
    }

    /// The reclaimer thread panicked: what it was doing is unknown, so the engine persists
    /// nothing more.
    fn reclaimer_panicked(&self, message: &str) {
        tracing::error!(
            panic = message,
            "the reclaimer thread panicked; the engine refuses further persistence until restarted"
        );
        if let Some(store) = &self.store {
            store.poison_now();
        }
    }
}
