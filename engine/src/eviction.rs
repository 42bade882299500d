//! The eviction seam: which resident block goes first when space is needed.
//!
//! A policy orders entries it is told about and hands back the coldest on request. It knows
//! nothing of keys, bytes or pins: the engine skips pinned victims and tells the policy about
//! every insert, access and removal. Policies are single-threaded; the engine serialises calls.
//!
//! Entries are small integers ([`EntryId`]) chosen by the engine and reused after removal, so
//! a policy can keep its state in flat arrays: no allocation per access, no hashing.

use std::fmt;

/// Which policy to run. Chosen in [`EngineConfig`](crate::EngineConfig).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EvictionPolicyKind {
    /// Least recently used.
    #[default]
    Lru,
}

/// Dense identifier of a resident entry, assigned by the engine.
pub type EntryId = u32;

/// Orders resident entries for eviction.
pub trait EvictionPolicy: Send + fmt::Debug {
    /// A new entry became resident. `id` is not currently tracked.
    fn insert(&mut self, id: EntryId);
    /// A tracked entry was used.
    fn access(&mut self, id: EntryId);
    /// A tracked entry left for a reason of its own (removed, overwritten).
    fn remove(&mut self, id: EntryId);
    /// Removes and returns the entry to evict first, or `None` when nothing is tracked.
    fn pop_victim(&mut self) -> Option<EntryId>;
    /// Number of tracked entries.
    fn len(&self) -> usize;
    /// Whether nothing is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the policy a config names.
pub(crate) fn new_policy(kind: EvictionPolicyKind) -> Box<dyn EvictionPolicy> {
    match kind {
        EvictionPolicyKind::Lru => Box::new(Lru::default()),
    }
}

const NIL: EntryId = EntryId::MAX;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: EntryId,
    next: EntryId,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
};

/// Least recently used: a doubly linked list threaded through a flat array indexed by entry.
/// Every operation is O(1); 8 bytes per entry.
#[derive(Debug)]
pub struct Lru {
    links: Vec<Link>,
    /// Most recently used.
    head: EntryId,
    /// Least recently used: the next victim.
    tail: EntryId,
    len: usize,
}

impl Default for Lru {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl Lru {
    fn is_linked(&self, id: EntryId) -> bool {
        self.links
            .get(id as usize)
            .is_some_and(|l| l.prev != NIL || self.head == id)
    }

    fn push_front(&mut self, id: EntryId) {
        let old_head = self.head;
        self.links[id as usize] = Link {
            prev: NIL,
            next: old_head,
        };
        if old_head == NIL {
            self.tail = id;
        } else {
            self.links[old_head as usize].prev = id;
        }
        self.head = id;
    }

    fn unlink(&mut self, id: EntryId) {
        let Link { prev, next } = self.links[id as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.links[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.links[next as usize].prev = prev;
        }
        self.links[id as usize] = UNLINKED;
    }
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, id: EntryId) {
        assert_ne!(id, NIL, "entry id reserved for the list's end");
        if self.links.len() <= id as usize {
            self.links.resize(id as usize + 1, UNLINKED);
        }
        assert!(!self.is_linked(id), "entry {id} inserted twice");
        self.push_front(id);
        self.len += 1;
    }

    fn access(&mut self, id: EntryId) {
        debug_assert!(self.is_linked(id));
        if self.head != id {
            self.unlink(id);
            self.push_front(id);
        }
    }

    fn remove(&mut self, id: EntryId) {
        debug_assert!(self.is_linked(id));
        self.unlink(id);
        self.len -= 1;
    }

    fn pop_victim(&mut self) -> Option<EntryId> {
        let victim = self.tail;
        if victim == NIL {
            return None;
        }
        self.unlink(victim);
        self.len -= 1;
        Some(victim)
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn evicts_least_recently_used_first() {
        let mut lru = Lru::default();
        for id in 0..4 {
            lru.insert(id);
        }
        lru.access(0);
        lru.remove(2);
        assert_eq!(lru.pop_victim(), Some(1));
        assert_eq!(lru.pop_victim(), Some(3));
        assert_eq!(lru.pop_victim(), Some(0));
        assert_eq!(lru.pop_victim(), None);
        assert!(lru.is_empty());
    }

    proptest! {
        /// The linked list behaves exactly like a queue ordered by last use.
        #[test]
        fn matches_a_reference_model(ops in proptest::collection::vec((0u8..4, 0u32..32), 0..400)) {
            let mut lru = Lru::default();
            let mut model: VecDeque<u32> = VecDeque::new(); // front = most recent
            for (op, id) in ops {
                let present = model.contains(&id);
                match op {
                    0 if !present => { lru.insert(id); model.push_front(id); }
                    1 if present => {
                        lru.access(id);
                        model.retain(|&x| x != id);
                        model.push_front(id);
                    }
                    2 if present => { lru.remove(id); model.retain(|&x| x != id); }
                    3 => prop_assert_eq!(lru.pop_victim(), model.pop_back()),
                    _ => {}
                }
                prop_assert_eq!(lru.len(), model.len());
            }
        }
    }
}
