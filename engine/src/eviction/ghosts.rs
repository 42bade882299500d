//! ARC's ghost lists: the fingerprints of keys a segment let go of, oldest first, so a key
//! that comes back says which side gave it up too soon.
//!
//! Every eviction remembers one key, forgets the oldest, and every insert asks after its
//! key: three probes of a table far larger than the caches at a million blocks. The table is
//! one array of 8-byte slots (linear probing, at most half full), so a probe is one cache
//! line where a general hash map's is two (its control bytes, then its slot), and a slot's
//! place is known from the fingerprint alone, so a probe can be asked for early
//! ([`Ghosts::prefetch`]) and overlap the others' misses.

use std::collections::VecDeque;

use super::adaptive::{FREQUENT, RECENT};
use super::prefetch;

/// Keys let go of, oldest first, in two queues (one per segment) over one table. A key
/// taken out of the table (it came back) stays in its queue until it reaches the front.
#[derive(Debug, Default)]
pub(super) struct Ghosts {
    table: Table,
    /// Fingerprints per segment, oldest first. A slot's sequence number is its place:
    /// `next_seq` less the slots from it to the back.
    queues: [VecDeque<u32>; 2],
    /// Live ghosts per segment (in the table).
    pub(super) lens: [usize; 2],
    /// Per segment, the sequence number of the next key remembered.
    next_seq: [u32; 2],
}

/// A tag: the ghost's segment (bit 31), whether it was removed rather than evicted (bit
/// 30), always set (bit 29, so no slot of the table is all zeros) and a sequence number
/// (its segment's, bits 0..29) that tells the live queue slot of a key from the stale ones.
const SEGMENT_BIT: u32 = 1 << 31;
const REMOVED_BIT: u32 = 1 << 30;
const LIVE_BIT: u32 = 1 << 29;
const SEQ_MASK: u32 = LIVE_BIT - 1;

/// A key that came back: the segment it was let go from, and whether it was evicted (a
/// removed or overwritten key teaches nothing about the balance).
#[derive(Debug, Clone, Copy)]
pub(super) struct Returning {
    pub(super) segment: usize,
    pub(super) evicted: bool,
}

impl Ghosts {
    fn tag(segment: usize, seq: u32) -> u32 {
        (seq & SEQ_MASK) | LIVE_BIT | if segment == FREQUENT { SEGMENT_BIT } else { 0 }
    }

    fn same(tag: u32, segment: usize, seq: u32) -> bool {
        tag & !REMOVED_BIT == Self::tag(segment, seq)
    }

    fn segment_of(tag: u32) -> usize {
        if tag & SEGMENT_BIT == 0 {
            RECENT
        } else {
            FREQUENT
        }
    }

    /// Starts loading what [`take`](Self::take) or [`remember`](Self::remember) of
    /// `fingerprint` will probe.
    pub(super) fn prefetch(&self, fingerprint: u32) {
        self.table.prefetch(fingerprint);
    }

    /// Starts loading what the next trims of each segment probe: the two oldest of each (an
    /// eviction's trim and the insert's after it may each take one from the same queue).
    pub(super) fn prefetch_oldest(&self) {
        for queue in &self.queues {
            for &fingerprint in queue.iter().take(2) {
                self.table.prefetch(fingerprint);
            }
        }
    }

    pub(super) fn remember(&mut self, segment: usize, fingerprint: u32, evicted: bool) {
        let seq = self.next_seq[segment] & SEQ_MASK;
        self.next_seq[segment] = self.next_seq[segment].wrapping_add(1);
        let tag = Self::tag(segment, seq) | if evicted { 0 } else { REMOVED_BIT };
        if let Some(old) = self.table.insert(fingerprint, tag) {
            self.lens[Self::segment_of(old)] -= 1;
        }
        self.lens[segment] += 1;
        self.queues[segment].push_back(fingerprint);
    }

    /// Takes `fingerprint` out: where it was let go from, and how.
    pub(super) fn take(&mut self, fingerprint: u32) -> Option<Returning> {
        let slot = self.table.find(fingerprint)?;
        let tag = self.table.remove_at(slot);
        let segment = Self::segment_of(tag);
        self.lens[segment] -= 1;
        Some(Returning {
            segment,
            evicted: tag & REMOVED_BIT == 0,
        })
    }

    /// Forgets the oldest ghosts of `segment` until at most `keep` are live; drops stale
    /// queue slots on the way, and any beyond twice the live count plus a margin.
    pub(super) fn trim(&mut self, segment: usize, keep: usize) {
        while self.lens[segment] > keep || self.queues[segment].len() > 2 * keep + 64 {
            let queue = &mut self.queues[segment];
            let seq = self.next_seq[segment].wrapping_sub(queue.len() as u32) & SEQ_MASK;
            let Some(fingerprint) = queue.pop_front() else {
                break;
            };
            if let Some(slot) = self.table.find(fingerprint)
                && Self::same(self.table.tag_at(slot), segment, seq)
            {
                self.table.remove_at(slot);
                self.lens[segment] -= 1;
            }
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.table.bytes()
            + self.queues.iter().map(VecDeque::capacity).sum::<usize>() * size_of::<u32>()
    }
}

/// Fingerprint to tag, by linear probing in a power-of-two array kept at most half full
/// (a miss ends at an empty slot within a couple of probes); removal shifts the run that
/// follows back over the hole, so there are no tombstones to sweep. A slot is the
/// fingerprint (high half) and its tag (low half, never zero), or zero when empty.
#[derive(Debug, Default)]
struct Table {
    slots: Vec<u64>,
    len: usize,
    /// 64 less log2 of the slots: a fingerprint's home is the top bits of its mix.
    shift: u32,
}

const EMPTY: u64 = 0;
/// Slots of the first table (it doubles when it would be more than half full).
const MIN_SLOTS: usize = 64;

impl Table {
    fn home(&self, fingerprint: u32) -> usize {
        let mixed =
            (u64::from(fingerprint) ^ 0x2545_f491_4f6c_dd1d).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> self.shift) as usize
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn key_of(slot: u64) -> u32 {
        (slot >> 32) as u32
    }

    fn prefetch(&self, fingerprint: u32) {
        if !self.slots.is_empty() {
            prefetch(&self.slots[self.home(fingerprint)]);
        }
    }

    /// The slot holding `fingerprint`.
    fn find(&self, fingerprint: u32) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut at = self.home(fingerprint);
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return None;
            }
            if Self::key_of(slot) == fingerprint {
                return Some(at);
            }
            at = (at + 1) & self.mask();
        }
    }

    fn tag_at(&self, at: usize) -> u32 {
        self.slots[at] as u32
    }

    /// Sets `fingerprint`'s tag; returns the one it replaces.
    fn insert(&mut self, fingerprint: u32, tag: u32) -> Option<u32> {
        debug_assert_ne!(tag, 0, "a tag is never zero");
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let packed = (u64::from(fingerprint) << 32) | u64::from(tag);
        let mut at = self.home(fingerprint);
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                self.slots[at] = packed;
                self.len += 1;
                return None;
            }
            if Self::key_of(slot) == fingerprint {
                self.slots[at] = packed;
                return Some(slot as u32);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// Empties slot `at` (a full one) and returns its tag. Each slot after it in the run is
    /// moved back into the hole unless its home lies between the hole and it (moving it would
    /// put it before its home, where a probe never looks).
    fn remove_at(&mut self, at: usize) -> u32 {
        let tag = self.slots[at] as u32;
        let mask = self.mask();
        let mut hole = at;
        let mut next = at;
        loop {
            next = (next + 1) & mask;
            let slot = self.slots[next];
            if slot == EMPTY {
                break;
            }
            let home = self.home(Self::key_of(slot));
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.slots[hole] = slot;
                hole = next;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        tag
    }

    /// Doubles the slots (or makes the first ones) and places every entry again.
    fn grow(&mut self) {
        let slots = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; slots]);
        self.shift = 64 - slots.trailing_zeros();
        self.len = 0;
        for slot in old.into_iter().filter(|&s| s != EMPTY) {
            self.insert(Self::key_of(slot), slot as u32);
        }
    }

    fn bytes(&self) -> usize {
        self.slots.capacity() * size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The table against a standard map, over inserts, replacements, finds and removals from
    /// a small key space (long probe runs, wrap-around at the array's end, many shifts back).
    #[test]
    fn the_ghost_table_holds_what_a_map_holds() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut table = Table::default();
        let mut model: HashMap<u32, u32> = HashMap::new();
        for step in 0..200_000u32 {
            // Keys that share homes: a space of 3,000 over tables of up to 8,192 slots.
            let key = rng.random_range(0..3_000u32).wrapping_mul(0x0101_0101);
            if rng.random_bool(0.55) {
                let tag = LIVE_BIT | (step & SEQ_MASK);
                assert_eq!(
                    table.insert(key, tag),
                    model.insert(key, tag),
                    "insert {key}"
                );
            } else {
                let found = table.find(key).map(|at| table.remove_at(at));
                assert_eq!(found, model.remove(&key), "remove {key}");
            }
            assert_eq!(table.len, model.len());
            assert!(table.len * 2 <= table.slots.len());
        }
        for (&key, &tag) in &model {
            assert_eq!(table.find(key).map(|at| table.tag_at(at)), Some(tag));
        }
        assert!(
            (0..3_000u32)
                .map(|k| k.wrapping_mul(0x0101_0101))
                .filter(|k| !model.contains_key(k))
                .all(|k| table.find(k).is_none())
        );
    }

    /// A key that comes back and is let go again leaves stale slots in its queue; dropping
    /// them (here, past twice the live count plus the margin) must not take its live ghost,
    /// nor another segment's, whose sequence numbers are their own. Fails if a slot's
    /// sequence number is computed one off.
    #[test]
    fn stale_queue_slots_go_and_the_live_ghost_stays() {
        let mut ghosts = Ghosts::default();
        for round in 0..100u32 {
            ghosts.remember(RECENT, 7, true);
            assert!(ghosts.take(7).is_some());
            ghosts.remember(FREQUENT, 1_000 + round, true);
        }
        ghosts.remember(RECENT, 7, true);
        assert_eq!(ghosts.queues[RECENT].len(), 101);
        ghosts.trim(RECENT, 1);
        assert_eq!(ghosts.queues[RECENT].len(), 66, "stale slots dropped");
        assert_eq!(ghosts.lens, [1, 100]);
        ghosts.trim(FREQUENT, 100);
        assert_eq!(ghosts.lens, [1, 100]);
        // The oldest frequent ghost goes when the bound says so, and only it.
        ghosts.trim(FREQUENT, 99);
        assert!(ghosts.take(1_000).is_none());
        assert!(ghosts.take(1_001).is_some());
        let back = ghosts.take(7).expect("the live ghost stays");
        assert_eq!(back.segment, RECENT);
    }
}
