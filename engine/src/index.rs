//! The key index: key -> resident block, split into independently locked shards.
//!
//! A key is hashed once per operation; the hash picks the shard and is reused inside it. The
//! table stores `Arc<Slot>` only and compares keys through the slot, so a lookup touches the
//! table and the slot and nothing else, and each key is stored once.

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::SharedSeed;
use foldhash::fast::SeedableRandomState;
use hashbrown::HashTable;
use parking_lot::RwLock;

use crate::slot::Slot;

/// Shards of a hash table of slots. The hasher (hashbrown's own, foldhash) is seeded randomly
/// per index unless a seed is given, so keys that arrive from the network cannot be chosen to
/// pile into one bucket.
#[derive(Debug)]
pub(crate) struct Index {
    shards: Box<[RwLock<ShardMap>]>,
    hasher: SeedableRandomState,
    mask: u64,
}

/// One shard's table.
#[derive(Debug, Default)]
pub(crate) struct ShardMap {
    table: HashTable<Arc<Slot>>,
}

/// Shard selection uses bits the table does not use for itself: it takes buckets from the low
/// bits and its 7-bit tags from the top ones.
const SHARD_SHIFT: u32 = 40;

impl Index {
    /// `shards` is a power of two of at most 4096 (checked by config validation); `seed` fixes
    /// the hash (repeatable runs), none draws one.
    pub(crate) fn new(shards: usize, seed: Option<u64>) -> Self {
        assert!(shards.is_power_of_two() && shards <= 4096);
        Self {
            shards: (0..shards)
                .map(|_| RwLock::new(ShardMap::default()))
                .collect(),
            hasher: seed.map_or_else(SeedableRandomState::random, seeded),
            mask: shards as u64 - 1,
        }
    }

    pub(crate) fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(crate) fn shard(&self, hash: u64) -> &RwLock<ShardMap> {
        // The mask keeps the index below the shard count, itself a usize.
        &self.shards[((hash >> SHARD_SHIFT) & self.mask) as usize]
    }

    /// Calls `each` with every key, one shard at a time (a shard's lock is held while its
    /// keys are visited, so `each` must be quick and must not touch the index).
    pub(crate) fn for_each_key(&self, mut each: impl FnMut(&[u8])) {
        for shard in &self.shards {
            for slot in shard.read().table.iter() {
                each(&slot.key);
            }
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<Slot>> {
        let hash = self.hash(key);
        self.shard(hash).read().find(hash, key).cloned()
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        let hash = self.hash(key);
        self.shard(hash).read().find(hash, key).is_some()
    }
}

impl ShardMap {
    pub(crate) fn find(&self, hash: u64, key: &[u8]) -> Option<&Arc<Slot>> {
        self.table.find(hash, |slot| *slot.key == *key)
    }

    /// Whether `slot` itself is the one indexed under its key (not removed, not replaced).
    pub(crate) fn holds(&self, slot: &Arc<Slot>) -> bool {
        self.find(slot.hash, &slot.key)
            .is_some_and(|c| Arc::ptr_eq(c, slot))
    }

    /// Inserts `slot` under its key and returns the slot it replaced.
    pub(crate) fn insert(&mut self, slot: Arc<Slot>) -> Option<Arc<Slot>> {
        let hash = slot.hash;
        match self.table.entry(hash, |s| s.key == slot.key, |s| s.hash) {
            hashbrown::hash_table::Entry::Occupied(mut entry) => {
                Some(std::mem::replace(entry.get_mut(), slot))
            }
            hashbrown::hash_table::Entry::Vacant(entry) => {
                entry.insert(slot);
                None
            }
        }
    }

    /// Removes the slot of `key` if `condition` holds for it.
    pub(crate) fn remove_if(
        &mut self,
        hash: u64,
        key: &[u8],
        condition: impl FnOnce(&Arc<Slot>) -> bool,
    ) -> Option<Arc<Slot>> {
        let entry = self.table.find_entry(hash, |slot| *slot.key == *key).ok()?;
        if !condition(entry.get()) {
            return None;
        }
        Some(entry.remove().0)
    }
}

/// The hasher of an index with a fixed seed.
fn seeded(seed: u64) -> SeedableRandomState {
    SeedableRandomState::with_seed(seed, SharedSeed::global_fixed())
}

/// The hash an engine with `index_hash_seed: Some(seed)` gives `key`: what its eviction policy
/// sees as the key's hash (`EntryHint::key_hash`). For a simulation that feeds a policy the
/// same hashes as a replayed engine.
pub fn seeded_key_hash(seed: u64, key: &[u8]) -> u64 {
    seeded(seed).hash_one(key)
}

#[cfg(test)]
mod tests {
    use super::Index;

    #[test]
    fn a_seed_fixes_the_hash_and_none_draws_one() {
        let key = b"a block key";
        // The eviction policies remember keys by this hash: a replay that fixes the seed
        // repeats exactly.
        assert_eq!(
            Index::new(4, Some(7)).hash(key),
            Index::new(4, Some(7)).hash(key)
        );
        assert_ne!(
            Index::new(4, Some(7)).hash(key),
            Index::new(4, Some(8)).hash(key)
        );
        // Without one, each index draws its own: keys from the network cannot be chosen to
        // collide in every node alike.
        assert_ne!(Index::new(4, None).hash(key), Index::new(4, None).hash(key));
        assert_eq!(
            super::seeded_key_hash(7, key),
            Index::new(4, Some(7)).hash(key)
        );
    }
}
