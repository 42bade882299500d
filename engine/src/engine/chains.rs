//! Prefix chains: putting a chain block by block with each linked to the one before it
//! ([`ChainPut`]), how many leading blocks of a chain are held (`prefix_match`), counting uses,
//! and ended chains (`end_chain`), all hints for the eviction policies.

use std::fmt;
use std::sync::Arc;

use super::{Durability, Engine, Held, Inner, Reservation};
use crate::Result;
use crate::eviction::EntryId;
pub use crate::format::ChainEnd;
use crate::slot::{LEVELS, Level, Lineage, Slot};

/// One prefix chain being put block by block ([`Engine::chain`]): each block put or committed
/// through it follows the one before it, as in [`Engine::put_chain_with`]. A block that
/// fails breaks the link: the next one is recorded as having a parent the engine does not
/// hold.
pub struct ChainPut<'a> {
    pub(super) engine: &'a Engine,
    /// The block put last (or the named parent), pinned so that the eviction that makes room
    /// for the next cannot take it before the next links to it.
    pub(super) previous: Option<Held>,
    /// Whether the next block has a parent (named, or put before it here).
    pub(super) linked: bool,
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
    pub(super) fn next_lineage(&mut self, end: ChainEnd) -> Lineage {
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
    pub(super) fn link(&mut self, put: Result<Arc<Slot>>) -> Result<u64> {
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

impl Inner {
    /// Where `key`'s block is tracked in each tier, and its generation (to tell it from
    /// whatever reuses an entry id later). Takes and releases the key's index shard lock.
    pub(super) fn residency_ids(&self, key: &[u8]) -> Option<([EntryId; LEVELS], u64)> {
        let hash = self.index.hash(key);
        let shard = self.index.shard(hash).read();
        shard
            .find(hash, key)
            .map(|slot| (Level::ALL.map(|level| slot.entry(level)), slot.generation))
    }

    /// Counts the leading keys that have a block. Not a use: the reads that follow count
    /// one each (a one-sided reader reports its reads with `touch`), and counting the lookup
    /// too would count every hit twice, which a frequency-minded policy takes for reuse.
    pub(super) fn prefix_match(&self, keys: &[&[u8]]) -> usize {
        keys.iter()
            .take_while(|key| self.residency_ids(key).is_some())
            .count()
    }

    pub(super) fn touch_keys(&self, keys: &[&[u8]]) -> usize {
        let held: Vec<([EntryId; LEVELS], u64)> = keys
            .iter()
            .filter_map(|key| self.residency_ids(key))
            .collect();
        self.touch_all(&held);
        held.len()
    }

    /// Counts a use of each block (entry ids per tier and generation) in every tier.
    pub(super) fn touch_all(&self, blocks: &[([EntryId; LEVELS], u64)]) {
        if blocks.is_empty() {
            return;
        }
        for level in self.levels() {
            let mut residency = self.residency(level);
            for &(ids, generation) in blocks {
                residency.touch(ids[level.index()], generation);
            }
        }
    }

    pub(super) fn end_chain(&self, keys: &[&[u8]]) -> bool {
        let chain: Vec<([EntryId; LEVELS], u64)> = keys
            .iter()
            .filter_map(|key| self.residency_ids(key))
            .collect();
        if chain.is_empty() {
            return false;
        }
        let mut held = false;
        for level in self.levels() {
            held |= self.residency(level).chain_ended(&chain);
        }
        held
    }
}
