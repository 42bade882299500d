//! S3-FIFO (Juncheng Yang et al., "FIFO queues are all you need for cache eviction",
//! SOSP 2023).
//!
//! A new entry goes to a small FIFO queue (a tenth of the entries). When space is needed and
//! the small queue is over its share, its oldest entry leaves: to the main queue if it was used
//! while in the small queue, otherwise out, with its key hash remembered in a ghost queue. An
//! entry whose key hash is in the ghost queue when it comes back goes straight to main. The
//! main queue is a FIFO with reinsertion: an entry used since it last reached the end goes
//! round again (with its 2-bit use count decremented), otherwise it is evicted. Every
//! operation is O(1) amortised.

use std::collections::VecDeque;

use hashbrown::HashMap;

use super::lists::Lists;
use super::{EntryHint, EntryId, EvictionPolicy};

const SMALL: usize = 0;
const MAIN: usize = 1;
/// Saturation of the per-entry use count.
const MAX_FREQ: u8 = 3;
/// The small queue's share of the entries, in tenths.
const SMALL_TENTHS: usize = 1;

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    key_hash: u64,
    freq: u8,
}

/// S3-FIFO over entry ids. About 32 bytes per entry, plus a ghost entry (8 to 32 bytes) per entry.
#[derive(Debug, Default)]
pub struct S3Fifo {
    queues: Lists<2, Meta>,
    /// Key hashes of entries evicted from the small queue, oldest first; as many as there are
    /// tracked entries.
    ghost: VecDeque<u64>,
    /// How many times each hash is in `ghost`.
    ghost_counts: HashMap<u64, u32>,
}

impl S3Fifo {
    fn remember(&mut self, key_hash: u64) {
        self.ghost.push_back(key_hash);
        *self.ghost_counts.entry(key_hash).or_insert(0) += 1;
        while self.ghost.len() > self.len().max(1) {
            if let Some(old) = self.ghost.pop_front() {
                self.forget(old);
            }
        }
    }

    /// Takes one occurrence of `key_hash` out of the ghost count; whether there was one. The
    /// hash stays in the queue and is skipped when it reaches the front.
    fn forget(&mut self, key_hash: u64) -> bool {
        match self.ghost_counts.get_mut(&key_hash) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.ghost_counts.remove(&key_hash);
                true
            }
            None => false,
        }
    }

    /// Takes `id` off its queue, remembering its key if it leaves from the small one.
    fn evict(&mut self, id: EntryId) -> EntryId {
        let from_small = self.queues.list_of(id) == Some(SMALL);
        self.queues.unlink(id);
        if from_small {
            self.remember(self.queues.data(id).key_hash);
        }
        id
    }

    fn small_is_over_share(&self) -> bool {
        self.queues.len(SMALL) * 10 > self.len() * SMALL_TENTHS || self.queues.len(MAIN) == 0
    }
}

impl EvictionPolicy for S3Fifo {
    fn insert(&mut self, id: EntryId, hint: EntryHint) {
        self.queues.grow_to(id);
        assert!(
            self.queues.list_of(id).is_none(),
            "entry {id} inserted twice"
        );
        *self.queues.data_mut(id) = Meta {
            key_hash: hint.key_hash,
            freq: 0,
        };
        let queue = if self.forget(hint.key_hash) {
            MAIN
        } else {
            SMALL
        };
        self.queues.push_front(queue, id);
    }

    fn access(&mut self, id: EntryId) {
        let meta = self.queues.data_mut(id);
        meta.freq = (meta.freq + 1).min(MAX_FREQ);
    }

    fn remove(&mut self, id: EntryId) {
        self.queues.unlink(id);
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(EntryId) -> bool) -> Option<EntryId> {
        // Each entry moves from small to main at most once and goes round main at most
        // MAX_FREQ + 1 times per call, unless the engine keeps refusing entries; then a scan
        // of both queues, oldest first, settles it.
        let mut steps = (self.len() + 1) * (usize::from(MAX_FREQ) + 2);
        while steps > 0 && !self.is_empty() {
            steps -= 1;
            let queue = if self.small_is_over_share() {
                SMALL
            } else {
                MAIN
            };
            let id = self.queues.back(queue)?;
            let meta = *self.queues.data(id);
            if meta.freq > 0 {
                if queue == SMALL {
                    self.queues.data_mut(id).freq = 0;
                    self.queues.unlink(id);
                    self.queues.push_front(MAIN, id);
                } else {
                    self.queues.data_mut(id).freq -= 1;
                    self.queues.move_to_front(MAIN, id);
                }
            } else if evictable(id) {
                return Some(self.evict(id));
            } else {
                self.queues.move_to_front(queue, id);
            }
        }
        let id = [SMALL, MAIN]
            .into_iter()
            .flat_map(|queue| self.queues.iter_from_back(queue))
            .find(|&id| evictable(id))?;
        Some(self.evict(id))
    }

    fn len(&self) -> usize {
        self.queues.len(SMALL) + self.queues.len(MAIN)
    }

    fn memory_bytes(&self) -> usize {
        self.queues.capacity_bytes()
            + self.ghost.capacity() * size_of::<u64>()
            + self.ghost_counts.capacity() * (size_of::<(u64, u32)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(key_hash: u64) -> EntryHint {
        EntryHint {
            key_hash,
            ..EntryHint::default()
        }
    }

    #[test]
    fn one_hit_wonders_leave_before_blocks_used_twice() {
        let mut p = S3Fifo::default();
        for id in 0..20 {
            p.insert(id, hint(u64::from(id)));
        }
        // Entries 0..10 are used again while in the small queue: they go to main.
        for id in 0..10 {
            p.access(id);
        }
        let victims: Vec<EntryId> = (0..9).filter_map(|_| p.pop_victim(&mut |_| true)).collect();
        assert_eq!(victims, (10..19).collect::<Vec<_>>());
    }

    #[test]
    fn a_key_evicted_from_small_comes_back_to_main() {
        let mut p = S3Fifo::default();
        for id in 0..10 {
            p.insert(id, hint(100 + u64::from(id)));
        }
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
        // Key 100 returns under a new entry id: it skips the small queue.
        p.insert(0, hint(100));
        assert_eq!(p.queues.list_of(0), Some(MAIN));
        p.insert(10, hint(999));
        assert_eq!(p.queues.list_of(10), Some(SMALL));
    }
}
