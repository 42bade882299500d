//! Residency and accounting: which blocks each tier holds, in the order its eviction policy
//! keeps, with the table from the policy's entry ids back to blocks; and the per-tier counts
//! of blocks and bytes as copies arrive and leave.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use mooncake_kv_tiers::Tier;
use parking_lot::MutexGuard;

use super::Inner;
use crate::EngineConfig;
use crate::eviction::{EntryHint, EntryId, EvictionPolicy, new_policy_holding};
use crate::slot::{LEVELS, Level, NOT_RESIDENT, Slot};

/// One tier's eviction policy and the table that maps its entry ids back to slots.
#[derive(Debug)]
pub(super) struct Residency {
    level: Level,
    pub(super) policy: Box<dyn EvictionPolicy>,
    /// Indexed by entry id. The generation sits beside the slot so that checking an id
    /// against a generation reads this array only.
    slots: Vec<(u64, Option<Arc<Slot>>)>,
    free_ids: Vec<EntryId>,
}

impl Residency {
    pub(super) fn new(level: Level, config: &EngineConfig) -> Self {
        Self {
            level,
            policy: new_policy_holding(config.eviction_policy, config.hold_chain_parents),
            slots: Vec::new(),
            free_ids: Vec::new(),
        }
    }

    /// Starts tracking `slot`, unless it already is.
    pub(super) fn insert(&mut self, slot: &Arc<Slot>) {
        if self.holds(slot.entry(self.level), slot.generation) {
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
                let parent_id = parent.entry(self.level);
                self.holds(parent_id, parent.generation)
                    .then_some(parent_id)
            });
        self.slots[id as usize] = (slot.generation, Some(Arc::clone(slot)));
        slot.entries[self.level.index()].store(id, Ordering::Relaxed);
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
    pub(super) fn holds(&self, id: EntryId, generation: u64) -> bool {
        // Generations start at 1, so the 0 of a free id never matches.
        self.slots
            .get(id as usize)
            .is_some_and(|&(g, _)| g == generation)
    }

    pub(super) fn remove(&mut self, slot: &Slot) {
        let id = slot.entry(self.level);
        if self.holds(id, slot.generation) {
            self.policy.remove(id);
            self.release(id);
        }
    }

    pub(super) fn touch(&mut self, id: EntryId, generation: u64) {
        if self.holds(id, generation) {
            self.policy.access(id);
        }
    }

    /// Tells the policy that the chain of blocks `chain` (entry ids per tier and generation,
    /// head first) ended, from its deepest block resident here. Returns whether there was
    /// one.
    pub(super) fn chain_ended(&mut self, chain: &[([EntryId; LEVELS], u64)]) -> bool {
        let Some(&(ids, _)) = chain
            .iter()
            .rev()
            .find(|&&(ids, generation)| self.holds(ids[self.level.index()], generation))
        else {
            return false;
        };
        self.policy.chain_ended(ids[self.level.index()]);
        true
    }

    /// The next victim among the blocks `evictable` accepts (the others stay, as just used),
    /// and whether the policy expects it to be used again (if not, a tier below need not keep
    /// it).
    pub(super) fn pop_victim(
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

    pub(super) fn release(&mut self, id: EntryId) -> Arc<Slot> {
        let (_, slot) = std::mem::take(&mut self.slots[id as usize]);
        let slot = slot.expect("policy tracks only resident ids");
        slot.entries[self.level.index()].store(NOT_RESIDENT, Ordering::Relaxed);
        self.free_ids.push(id);
        slot
    }

    pub(super) fn resident(&self) -> Vec<Arc<Slot>> {
        self.slots
            .iter()
            .filter_map(|(_, slot)| slot.clone())
            .collect()
    }
}

impl Inner {
    /// The residency of `level`, locked.
    pub(super) fn residency(&self, level: Level) -> MutexGuard<'_, Residency> {
        self.residency[level.index()].lock()
    }

    /// Counts a block arriving on (`true`) or leaving (`false`) a tier.
    pub(super) fn account(&self, level: Level, slot: &Slot, arriving: bool) {
        let counts = self.counters.tier(level);
        let payload_bytes = u64::from(slot.payload_len);
        if arriving {
            counts.arrived(payload_bytes);
        } else {
            counts.left(payload_bytes);
        }
    }

    pub(super) fn forget_residency(&self, slot: &Slot) {
        for residency in &self.residency {
            residency.lock().remove(slot);
        }
    }

    pub(super) fn touch(&self, level: Level, slot: &Slot) {
        self.residency(level)
            .touch(slot.entry(level), slot.generation);
    }

    /// The medium at `level`, if this engine has it.
    pub(super) fn medium(&self, level: Level) -> Option<&dyn Tier> {
        match level {
            Level::Hbm => self.hbm.as_deref().map(|t| t as &dyn Tier),
            Level::Dram => Some(&*self.dram),
            Level::Nvme => self.store.as_ref().map(|s| &*s.tier as &dyn Tier),
        }
    }

    /// The levels this engine has, fastest first: DRAM, and HBM and NVMe when configured.
    pub(super) fn levels(&self) -> impl Iterator<Item = Level> + '_ {
        Level::ALL
            .into_iter()
            .filter(|&level| self.medium(level).is_some())
    }

    /// Bytes of the extents of the blocks pinned in `level` (pins hold DRAM copies only).
    pub(super) fn pinned_bytes(&self, level: Level) -> u64 {
        if level != Level::Dram {
            return 0;
        }
        self.residency(Level::Dram)
            .resident()
            .iter()
            .filter(|s| s.is_pinned())
            .filter_map(|s| s.dram().map(|d| d.extent_len_bytes()))
            .sum()
    }
}
