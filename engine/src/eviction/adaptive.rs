//! The default policy: ARC's balance of recency and frequency, learnt online, with the rules
//! a prefix chain gives for free.
//!
//! Adaptive Replacement Cache (Megiddo and Modha, FAST 2003) splits the resident blocks in
//! two: `recent`, seen once lately, and `frequent`, seen at least twice. Each is a recency
//! list. A ghost list behind each remembers the keys it let go of (32-bit fingerprints, no
//! bytes). A target `p` says how much of the cache `recent` may hold: space is taken from
//! `recent` while it holds more than `p`, else from `frequent`. A block that comes back while
//! its key is in `recent`'s ghost was let go too soon for its reuse distance: `p` grows (the
//! workload wants recency, LRU's strength). One that comes back from `frequent`'s ghost: `p`
//! shrinks (it wants the frequent set kept through scans of one-off blocks: S3-FIFO's and
//! LFU's strength). Either way it returns into `frequent`. The step is ARC's (the ratio of
//! the two ghosts' sizes, at least one block), the target starts at half the cache (ARC
//! starts at none of it, a lean towards frequency that a large cache takes long to unlearn),
//! and every bound is the cache's own size: nothing is fitted to a trace.
//!
//! One addition to ARC: a new block whose key a count-min sketch has seen before (the sketch
//! of [`PrefixAware`], which remembers about ten cache-sizes of uses, longer than the ghosts'
//! one) starts in `frequent`. A conversation that returns after a long pause is kept ahead of
//! one-off blocks; on the production trace that is 4.9 points of hits at 2% capacity.
//!
//! On top, what the prefix structure gives without learning, as in [`PrefixAware`]:
//! - a block with a resident child is not evicted before that child (`prefix_match` stops
//!   at the first missing block, so the child would be dead weight): it is parked, and
//!   returns to the end of its list when its last child leaves;
//! - a chain's partial last block not used since its put, and the blocks of a chain its
//!   caller ended, go before all others (their keys are not remembered as ghosts: they were
//!   let go on purpose, not too soon).
//!
//! Every operation is O(1): a probe of the ghost table and a sketch update on insert, list
//! moves otherwise. About 36 bytes per resident block, 32 to 64 of sketch, and at most one
//! ghost per resident block (8 bytes in its queue, 8 in the table): 95 bytes per block at 1M
//! blocks (the eviction bench).
//!
//! [`PrefixAware`]: super::PrefixAware

use std::collections::VecDeque;

use hashbrown::HashMap;

use super::chain::{ChainLink, Linked};
use super::lists::Lists;
use super::{EntryHint, EntryId, EvictionPolicy};

/// Blocks seen once lately.
const RECENT: usize = 0;
/// Blocks seen at least twice.
const FREQUENT: usize = 1;
/// Emptied before the others: ended chains (pushed at the back) and partial blocks not used
/// since their put (pushed at the front).
const FIRST_OUT: usize = 2;
const LISTS: usize = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// The key hash folded to 32 bits: what the ghost lists remember.
    fingerprint: u32,
    /// Its place in its chain.
    link: ChainLink,
    /// [`RECENT`] or [`FREQUENT`]: the half of the cache the entry counts in (also while it
    /// is parked or on the first-out list).
    segment: u8,
}

impl Linked for Meta {
    fn link(&self) -> &ChainLink {
        &self.link
    }
    fn link_mut(&mut self) -> &mut ChainLink {
        &mut self.link
    }
}

/// Keys let go of, oldest first, in two queues (one per segment) over one table. A key
/// taken out of the table (it came back) stays in its queue until it reaches the front.
#[derive(Debug, Default)]
struct Ghosts {
    /// Fingerprint to the ghost's segment (bit 31), whether it was removed rather than
    /// evicted (bit 30) and sequence number (bits 0..30).
    table: HashMap<u32, u32>,
    queues: [VecDeque<(u32, u32)>; 2],
    /// Live ghosts per segment (in the table).
    lens: [usize; 2],
    next_seq: u32,
}

const SEGMENT_BIT: u32 = 1 << 31;
const REMOVED_BIT: u32 = 1 << 30;
const SEQ_MASK: u32 = REMOVED_BIT - 1;

/// A key that came back: the segment it was let go from, and whether it was evicted (a
/// removed or overwritten key teaches nothing about the balance).
#[derive(Debug, Clone, Copy)]
struct Returning {
    segment: usize,
    evicted: bool,
}

impl Ghosts {
    fn tag(segment: usize, seq: u32) -> u32 {
        (seq & SEQ_MASK) | if segment == FREQUENT { SEGMENT_BIT } else { 0 }
    }

    fn same(tag: u32, segment: usize, seq: u32) -> bool {
        tag & !REMOVED_BIT == Self::tag(segment, seq)
    }

    fn remember(&mut self, segment: usize, fingerprint: u32, evicted: bool) {
        let seq = self.next_seq & SEQ_MASK;
        self.next_seq = self.next_seq.wrapping_add(1);
        let tag = Self::tag(segment, seq) | if evicted { 0 } else { REMOVED_BIT };
        if let Some(old) = self.table.insert(fingerprint, tag) {
            self.lens[Self::segment_of(old)] -= 1;
        }
        self.lens[segment] += 1;
        self.queues[segment].push_back((fingerprint, seq));
    }

    fn segment_of(tag: u32) -> usize {
        if tag & SEGMENT_BIT == 0 {
            RECENT
        } else {
            FREQUENT
        }
    }

    /// Takes `fingerprint` out: where it was let go from, and how.
    fn take(&mut self, fingerprint: u32) -> Option<Returning> {
        let tag = self.table.remove(&fingerprint)?;
        let segment = Self::segment_of(tag);
        self.lens[segment] -= 1;
        Some(Returning {
            segment,
            evicted: tag & REMOVED_BIT == 0,
        })
    }

    /// Forgets the oldest ghosts of `segment` until at most `keep` are live; drops stale
    /// queue slots on the way, and any beyond twice the live count plus a margin.
    fn trim(&mut self, segment: usize, keep: usize) {
        while self.lens[segment] > keep || self.queues[segment].len() > 2 * keep + 64 {
            let Some((fingerprint, seq)) = self.queues[segment].pop_front() else {
                break;
            };
            if self
                .table
                .get(&fingerprint)
                .is_some_and(|&tag| Self::same(tag, segment, seq))
            {
                self.table.remove(&fingerprint);
                self.lens[segment] -= 1;
            }
        }
    }

    fn bytes(&self) -> usize {
        self.table.capacity() * (size_of::<(u32, u32)>() + 1)
            + self.queues.iter().map(VecDeque::capacity).sum::<usize>() * size_of::<(u32, u32)>()
    }
}

/// ARC with the prefix rules; see the module's documentation.
#[derive(Debug, Default)]
pub struct Adaptive {
    lists: Lists<LISTS, Meta>,
    ghosts: Ghosts,
    sketch: super::prefix::Sketch,
    /// The target size of the recent segment, 0 to the number of resident entries; half of
    /// them until the first ghost hit moves it (no leaning either way before the workload
    /// shows one).
    target_recent: Option<usize>,
    /// Resident entries per segment (listed, parked or first out).
    segment_lens: [usize; 2],
    /// Working space: entries refused by the current `pop_victim`, or the blocks of an ended
    /// chain (kept to reuse the allocation).
    refused: Vec<EntryId>,
    /// The last victim came off the first-out list.
    victim_first_out: bool,
    /// Evict a parent of resident children as any other entry (a cluster member's setting).
    lets_parents_go: bool,
    /// Whether ghost hits move the target (off only in tests: what adapting buys).
    frozen: bool,
}

impl Adaptive {
    /// The policy without its leaf rule: a block with resident children is evicted as any
    /// other (chain links still serve [`EvictionPolicy::chain_ended`]). For a cache that holds
    /// only shares of chains, where a resident child says little about whether its prefix is
    /// whole.
    pub fn letting_parents_go() -> Self {
        Self {
            lets_parents_go: true,
            ..Self::default()
        }
    }

    /// The target share of the recent segment, in entries.
    pub fn target_recent(&self) -> usize {
        self.target_recent.unwrap_or(self.len() / 2)
    }

    /// Puts `id` (unlisted) at the front of `segment`, counting it there.
    fn place(&mut self, id: EntryId, segment: usize) {
        let meta = self.lists.data_mut(id);
        let old = usize::from(meta.segment);
        meta.segment = segment as u8;
        self.segment_lens[old] -= 1;
        self.segment_lens[segment] += 1;
        self.lists.push_front(segment, id);
    }

    /// Stops tracking `id`; a parked parent left with no child goes to the end of its list.
    fn detach(&mut self, id: EntryId) {
        self.segment_lens[usize::from(self.lists.data(id).segment)] -= 1;
        if let Some(parent) = self.lists.detach(id) {
            let segment = usize::from(self.lists.data(parent).segment);
            self.lists.push_back(segment, parent);
        }
    }

    /// ARC's ghost bounds: the recent segment and its ghosts hold at most the cache's size,
    /// and all ghosts together at most the cache's size.
    fn trim_ghosts(&mut self) {
        let size = self.len();
        let recent = size.saturating_sub(self.segment_lens[RECENT]);
        self.ghosts.trim(RECENT, recent);
        let frequent = size.saturating_sub(self.ghosts.lens[RECENT]);
        self.ghosts.trim(FREQUENT, frequent);
    }

    /// ARC's adaptation on a block that comes back from `segment`'s ghost.
    fn adapt(&mut self, segment: usize) {
        if self.frozen {
            return;
        }
        let [recent, frequent] = self.ghosts.lens;
        // The ghost just taken out counted in its segment.
        let (recent, frequent) = match segment {
            RECENT => (recent + 1, frequent),
            _ => (recent, frequent + 1),
        };
        let target = self.target_recent();
        self.target_recent = Some(if segment == RECENT {
            let step = (frequent / recent).max(1);
            (target + step).min(self.len())
        } else {
            let step = (recent / frequent).max(1);
            target.saturating_sub(step)
        });
    }

    /// The list to take the next victim from.
    fn next_list(&self) -> Option<usize> {
        if self.lists.back(FIRST_OUT).is_some() {
            return Some(FIRST_OUT);
        }
        let recent_first =
            self.segment_lens[RECENT] > self.target_recent() || self.lists.back(FREQUENT).is_none();
        let order = if recent_first {
            [RECENT, FREQUENT]
        } else {
            [FREQUENT, RECENT]
        };
        order.into_iter().find(|&l| self.lists.back(l).is_some())
    }

    #[cfg(test)]
    fn freeze(&mut self) {
        self.frozen = true;
    }
}

impl EvictionPolicy for Adaptive {
    fn insert(&mut self, id: EntryId, hint: EntryHint) {
        self.lists.grow_to(id);
        assert!(!self.lists.tracks(id), "entry {id} inserted twice");
        let link = self.lists.new_link(id, hint.parent);
        let fingerprint = (hint.key_hash ^ (hint.key_hash >> 32)) as u32;
        let returning = self.ghosts.take(fingerprint);
        self.sketch.fit(self.len() + 1);
        // Seen before within the sketch's memory, which outlasts the ghosts'.
        let seen = self.sketch.count(fingerprint) >= 2;
        let segment = if returning.is_some() || seen {
            FREQUENT
        } else {
            RECENT
        };
        *self.lists.data_mut(id) = Meta {
            fingerprint,
            link,
            segment: segment as u8,
        };
        self.segment_lens[segment] += 1;
        if let Some(Returning {
            segment,
            evicted: true,
        }) = returning
        {
            self.adapt(segment);
        }
        if hint.partial && returning.is_none() {
            self.lists.push_front(FIRST_OUT, id);
        } else {
            self.lists.push_front(segment, id);
        }
        self.trim_ghosts();
    }

    fn access(&mut self, id: EntryId) {
        debug_assert!(self.lists.tracks(id));
        self.sketch.increment(self.lists.data(id).fingerprint);
        self.lists.unlist(id);
        self.place(id, FREQUENT);
    }

    fn remove(&mut self, id: EntryId) {
        // Remembered, so a key put again (overwritten) comes back as seen before.
        let meta = *self.lists.data(id);
        self.detach(id);
        self.ghosts
            .remember(usize::from(meta.segment), meta.fingerprint, false);
        self.trim_ghosts();
    }

    fn chain_ended(&mut self, id: EntryId) {
        self.lists.end_chain(id, FIRST_OUT, &mut self.refused);
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(EntryId) -> bool) -> Option<EntryId> {
        // A parent of resident children is parked until its last child leaves. An entry the
        // engine refuses (pinned) is set aside for the rest of the call, so each is looked at
        // once, then put back as just used in its segment.
        let mut refused = std::mem::take(&mut self.refused);
        let mut victim = None;
        while let Some(list) = self.next_list() {
            let Some(id) = self.lists.back(list) else {
                break;
            };
            if self.lists.data(id).link.children > 0 && !self.lets_parents_go {
                self.lists.park(id);
            } else if evictable(id) {
                self.victim_first_out = list == FIRST_OUT;
                let meta = *self.lists.data(id);
                self.detach(id);
                if list != FIRST_OUT {
                    self.ghosts
                        .remember(usize::from(meta.segment), meta.fingerprint, true);
                }
                victim = Some(id);
                break;
            } else {
                self.lists.unlink(id);
                refused.push(id);
            }
        }
        for &id in &refused {
            let segment = usize::from(self.lists.data(id).segment);
            self.lists.push_front(segment, id);
        }
        refused.clear();
        self.refused = refused;
        self.trim_ghosts();
        victim
    }

    fn victim_has_no_future(&self) -> bool {
        self.victim_first_out
    }

    fn len(&self) -> usize {
        self.segment_lens[RECENT] + self.segment_lens[FREQUENT]
    }

    fn memory_bytes(&self) -> usize {
        self.lists.capacity_bytes() + self.ghosts.bytes() + self.sketch.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    /// A cache of `capacity` blocks over `Adaptive`, used as the replay uses a policy: a key
    /// held is a hit (an access), a key not held is put (an insert), evicting as needed.
    struct Cache {
        policy: Adaptive,
        held: Map<u64, EntryId>,
        keys: Vec<u64>,
        free: Vec<EntryId>,
        capacity: usize,
    }

    impl Cache {
        fn new(capacity: usize) -> Self {
            Self {
                policy: Adaptive::default(),
                held: Map::new(),
                keys: Vec::new(),
                free: Vec::new(),
                capacity,
            }
        }

        /// Uses `key`: whether it was held.
        fn touch(&mut self, key: u64) -> bool {
            if let Some(&id) = self.held.get(&key) {
                self.policy.access(id);
                return true;
            }
            let id = self.free.pop().unwrap_or_else(|| {
                self.keys.push(0);
                (self.keys.len() - 1) as EntryId
            });
            self.keys[id as usize] = key;
            // Key hashes far apart in both halves, so fingerprints differ.
            let key_hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            self.policy.insert(
                id,
                EntryHint {
                    key_hash,
                    ..EntryHint::default()
                },
            );
            self.held.insert(key, id);
            while self.held.len() > self.capacity {
                let victim = self.policy.pop_victim(&mut |_| true).expect("a victim");
                self.held.remove(&self.keys[victim as usize]);
                self.free.push(victim);
            }
            false
        }
    }

    const CAPACITY: usize = 1_000;

    /// Keys used twice each, the second use `distance` keys after the first: what only a
    /// large recent side catches when `distance` is near the cache's size. Returns the hits.
    fn used_twice(cache: &mut Cache, first_key: u64, keys: u64, distance: u64) -> u64 {
        let mut hits = 0;
        for i in 0..keys + distance {
            if i < keys {
                hits += u64::from(cache.touch(first_key + i));
            }
            if i >= distance {
                hits += u64::from(cache.touch(first_key + i - distance));
            }
        }
        hits
    }

    /// A hot set of half the cache, each hot key used in turn, each use followed by one
    /// block of a scan (never used again). Returns the hits on the hot set.
    fn hot_set_through_a_scan(cache: &mut Cache, rounds: u64) -> u64 {
        let hot = CAPACITY as u64 / 2;
        let mut hits = 0;
        let mut scan = 10_000_000;
        for round in 0..rounds {
            for key in 0..hot {
                hits += u64::from(cache.touch(1_000_000 + key));
                let _ = round;
                cache.touch(scan);
                scan += 1;
            }
        }
        hits
    }

    /// A frequent set (each key used three times) fills the frequent side; then the
    /// workload turns to keys used twice at a distance of 3/4 of the cache, which only a
    /// recent side grown past its start catches. Frozen, the target stays where the frequent
    /// set left it and the stale frequent set is kept at the new keys' expense.
    fn recency_after_a_frequent_set(frozen: bool) -> (u64, u64) {
        let mut cache = Cache::new(CAPACITY);
        for _ in 0..3 {
            for key in 0..CAPACITY as u64 {
                cache.touch(key);
            }
        }
        if frozen {
            cache.policy.freeze();
        }
        let keys = 20 * CAPACITY as u64;
        let hits = used_twice(&mut cache, 1_000_000_000, keys, 3 * CAPACITY as u64 / 4);
        (hits, keys)
    }

    #[test]
    fn ghost_hits_on_the_recent_side_grow_it() {
        let (hits, keys) = recency_after_a_frequent_set(false);
        let (frozen_hits, _) = recency_after_a_frequent_set(true);
        // Adapting, most second uses hit; frozen, few do.
        assert!(hits * 10 > keys * 7, "adaptive: {hits} of {keys}");
        assert!(
            frozen_hits * 10 < keys * 3,
            "frozen: {frozen_hits} of {keys}"
        );
    }

    /// The same recency workload first (the target grows), then a hot set of half the cache
    /// used through a scan: only a target that shrinks again keeps the hot set.
    fn hot_set_after_recency(frozen: bool) -> (u64, u64) {
        let mut cache = Cache::new(CAPACITY);
        used_twice(&mut cache, 0, 20 * CAPACITY as u64, 3 * CAPACITY as u64 / 4);
        assert!(cache.policy.target_recent() > CAPACITY / 2);
        if frozen {
            cache.policy.freeze();
        }
        let rounds = 20;
        let hits = hot_set_through_a_scan(&mut cache, rounds);
        (hits, rounds * CAPACITY as u64 / 2)
    }

    #[test]
    fn ghost_hits_on_the_frequent_side_shrink_the_recent_one() {
        let (hits, uses) = hot_set_after_recency(false);
        let (frozen_hits, _) = hot_set_after_recency(true);
        assert!(hits * 10 > uses * 7, "adaptive: {hits} of {uses}");
        assert!(
            frozen_hits * 10 < uses * 3,
            "frozen: {frozen_hits} of {uses}"
        );
    }
}
