//! Least recently used.

use super::lists::Lists;
use super::{EntryHint, EntryId, EvictionPolicy};

/// Least recently used: one list threaded through a flat array indexed by entry. Every
/// operation is O(1); 12 bytes per entry.
#[derive(Debug, Default)]
pub struct Lru {
    list: Lists<1>,
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, id: EntryId, _hint: EntryHint) {
        self.list.grow_to(id);
        assert!(self.list.list_of(id).is_none(), "entry {id} inserted twice");
        self.list.push_front(0, id);
    }

    fn access(&mut self, id: EntryId) {
        debug_assert!(self.list.list_of(id).is_some());
        self.list.move_to_front(0, id);
    }

    fn remove(&mut self, id: EntryId) {
        self.list.unlink(id);
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(EntryId) -> bool) -> Option<EntryId> {
        for _ in 0..self.len() {
            let id = self.list.back(0)?;
            if evictable(id) {
                self.list.unlink(id);
                return Some(id);
            }
            self.list.move_to_front(0, id);
        }
        None
    }

    fn len(&self) -> usize {
        self.list.len(0)
    }

    fn memory_bytes(&self) -> usize {
        self.list.capacity_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn any(_: EntryId) -> bool {
        true
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut lru = Lru::default();
        for id in 0..4 {
            lru.insert(id, EntryHint::default());
        }
        lru.access(0);
        lru.remove(2);
        assert_eq!(lru.pop_victim(&mut any), Some(1));
        assert_eq!(lru.pop_victim(&mut any), Some(3));
        assert_eq!(lru.pop_victim(&mut any), Some(0));
        assert_eq!(lru.pop_victim(&mut any), None);
        assert!(lru.is_empty());
    }

    #[test]
    fn a_refused_entry_is_kept_as_just_used() {
        let mut lru = Lru::default();
        for id in 0..3 {
            lru.insert(id, EntryHint::default());
        }
        assert_eq!(lru.pop_victim(&mut |id| id != 0), Some(1));
        assert_eq!(lru.pop_victim(&mut |id| id == 42), None);
        assert_eq!(lru.len(), 2);
        // The second call refused 2 first, then 0, so 2 is now the older of the two.
        assert_eq!(lru.pop_victim(&mut any), Some(2));
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
                    0 if !present => { lru.insert(id, EntryHint::default()); model.push_front(id); }
                    1 if present => {
                        lru.access(id);
                        model.retain(|&x| x != id);
                        model.push_front(id);
                    }
                    2 if present => { lru.remove(id); model.retain(|&x| x != id); }
                    3 => prop_assert_eq!(lru.pop_victim(&mut any), model.pop_back()),
                    _ => {}
                }
                prop_assert_eq!(lru.len(), model.len());
            }
        }
    }
}
