//! A prefix-aware policy: leaves first, then recency, frequency and depth.
//!
//! A request can only use a cached prefix from its head: `prefix_match` stops at the first
//! missing block. So a block whose child is resident is never evicted before that child
//! (the child would become dead weight), and among the rest the policy evicts the entry with
//! the lowest priority
//!
//! ```text
//! priority = last use (a tick of this policy's clock: one per insert or use)
//!          + LEVEL_BOOST   * frequency level (log2 of the key's recent use count, 0..=3)
//!          - DEPTH_PENALTY * depth in the chain (capped at 15)
//! ```
//!
//! A chain's partial last block ([`EntryHint::partial`]) goes before all of these: it waits
//! in a first-out list of its own that is emptied first, and leaves it for the classes below
//! when it is used. A partial block is only ever used by the same prompt again, which is rare
//! (0.8% of them on the production trace, against 26% of full blocks). A chain its caller
//! ended ([`EvictionPolicy::chain_ended`]) joins the same list at its going-out end, tail
//! first, up to the first block another resident chain goes through; a use takes a block
//! back out.
//!
//! Frequency comes from a count-min sketch of key hashes with 4-bit counters that are halved
//! every five cache-sizes of uses, a page of the sketch at a time (TinyLFU's aging, spread
//! out), so it remembers keys after they were evicted: a conversation's blocks that come
//! back a second time are kept longer than one-off blocks. On the production conversation
//! trace that is what separates a policy from LRU: most first-time blocks are never used
//! again, blocks used twice usually are.
//!
//! Priority is exact and O(1) to maintain: entries sit in one recency list per (level, depth)
//! class, 64 in all, and within a class the list order is the priority order; a victim is the
//! back of the first-out list (an ended chain's tail, or the oldest unused partial block),
//! else the lowest of the 64 list ends. Ending a chain costs one step per block it lets go.

use super::chain::{ChainLink, Linked};
use super::lists::Lists;
use super::{EntryHint, EntryId, EvictionPolicy};

/// Frequency levels: log2 of a 4-bit count.
const LEVELS: usize = 4;
/// Depth classes: 0 to 15 (deeper chains share the last one).
const DEPTHS: usize = 16;
const CLASSES: usize = LEVELS * DEPTHS;
/// The list emptied before the classes: partial blocks not used since their put (oldest at
/// the back), and ended chains (pushed at the back, so they go first).
const FIRST_OUT: usize = CLASSES;
const LISTS: usize = CLASSES + 1;

/// Ticks one frequency level is worth: an entry a level up outlives one used this many
/// inserts and uses later. About the number of block accesses between a conversation's
/// turns on the production trace (a few minutes of traffic).
pub(super) const LEVEL_BOOST: u64 = 15_000;
/// Ticks each step of depth costs: of two blocks used at once, the deeper goes first.
pub(super) const DEPTH_PENALTY: u64 = 100;

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// The policy clock when the entry was last used (or inserted, or refused as a victim).
    tick: u64,
    /// The key hash folded to 32 bits: what the sketch counts.
    sketch_hash: u32,
    /// Its place in its chain.
    link: ChainLink,
    /// Depth class, 0..DEPTHS.
    depth: u8,
}

impl Linked for Meta {
    fn link(&self) -> &ChainLink {
        &self.link
    }
    fn link_mut(&mut self) -> &mut ChainLink {
        &mut self.link
    }
}

/// Leaves first, then recency, frequency and depth: a block with a resident child is never
/// evicted (it waits, at its old priority, until its last child leaves; unless built with
/// [`PrefixAware::letting_parents_go`], for a cluster member). Among the rest, a
/// chain its caller ended goes first, then a partial block not used since its put, then the
/// lowest
/// `last use + LEVEL_BOOST x frequency level - DEPTH_PENALTY x depth`, frequency coming from a
/// count-min sketch of key hashes that outlives residency. O(1) per access; about 50 bytes
/// per entry plus a 32 to 64-byte share of the sketch.
#[derive(Debug, Default)]
pub struct PrefixAware {
    classes: Lists<LISTS, Meta>,
    sketch: Sketch,
    clock: u64,
    len: usize,
    /// Working space: entries refused by the current `pop_victim`, or the blocks of an ended
    /// chain (kept to reuse the allocation).
    refused: Vec<EntryId>,
    /// The last victim came off the first-out list.
    victim_first_out: bool,
    /// Evict a parent of resident children as any other entry (a cluster member's setting:
    /// see [`PrefixAware::letting_parents_go`]).
    lets_parents_go: bool,
}

impl PrefixAware {
    /// The policy without its leaf rule: a block with resident children is ranked and
    /// evicted as any other (chain links still serve [`EvictionPolicy::chain_ended`]). For a
    /// cache that holds only shares of chains, where a resident child says little about
    /// whether its prefix is whole.
    pub fn letting_parents_go() -> Self {
        Self {
            lets_parents_go: true,
            ..Self::default()
        }
    }

    /// What an entry of `class` adds to its last use: its frequency level's boost, and the
    /// penalty of its depth counted down from the deepest class.
    const fn class_offset(class: usize) -> u64 {
        let level = (class / DEPTHS) as u64;
        let depth = (class % DEPTHS) as u64;
        LEVEL_BOOST * level + DEPTH_PENALTY * (DEPTHS as u64 - 1 - depth)
    }

    fn class(&self, id: EntryId) -> usize {
        let meta = self.classes.data(id);
        self.sketch.level(meta.sketch_hash) * DEPTHS + usize::from(meta.depth)
    }

    /// Marks `id` used now, in the class of its current frequency.
    fn bump(&mut self, id: EntryId) {
        self.clock += 1;
        self.classes.data_mut(id).tick = self.clock;
        self.classes.unpark(id);
        let class = self.class(id);
        if self.classes.list_of(id).is_some() {
            self.classes.move_to_front(class, id);
        } else {
            self.classes.push_front(class, id);
        }
    }

    /// Stops tracking `id`, and tells its parent it has one child fewer: a parked parent
    /// left with none goes back to the end of its class, to leave next.
    fn detach(&mut self, id: EntryId) {
        self.len -= 1;
        if let Some(parent) = self.classes.detach(id) {
            let class = self.class(parent);
            self.classes.push_back(class, parent);
        }
    }

    /// The tracked entry to go first: the back of the first-out list, else the entry of
    /// lowest priority (of two equal, the deeper).
    fn lowest(&self) -> Option<EntryId> {
        if let Some(id) = self.classes.back(FIRST_OUT) {
            return Some(id);
        }
        // A class's entries share its offset, so only the end's last use is read (one load
        // per class: this scan is most of an eviction's cost).
        let mut best: Option<(u64, usize, EntryId)> = None;
        for class in 0..CLASSES {
            let Some(id) = self.classes.back(class) else {
                continue;
            };
            let priority = self.classes.data(id).tick + Self::class_offset(class);
            let shallowness = DEPTHS - class % DEPTHS;
            if best.is_none_or(|(p, s, _)| (priority, shallowness) < (p, s)) {
                best = Some((priority, shallowness, id));
            }
        }
        best.map(|(_, _, id)| id)
    }

    /// Resident children of `id` (for tests).
    #[cfg(test)]
    fn children(&self, id: EntryId) -> u32 {
        self.classes.data(id).link.children
    }
}

impl EvictionPolicy for PrefixAware {
    fn insert(&mut self, id: EntryId, hint: EntryHint) {
        self.classes.grow_to(id);
        assert!(!self.classes.tracks(id), "entry {id} inserted twice");
        let link = self.classes.new_link(id, hint.parent);
        let sketch_hash = (hint.key_hash ^ (hint.key_hash >> 32)) as u32;
        *self.classes.data_mut(id) = Meta {
            tick: 0,
            sketch_hash,
            link,
            depth: hint.depth.min(DEPTHS as u32 - 1) as u8,
        };
        self.len += 1;
        self.sketch.fit(self.len);
        self.sketch.increment(sketch_hash);
        if hint.partial {
            self.clock += 1;
            self.classes.data_mut(id).tick = self.clock;
            self.classes.push_front(FIRST_OUT, id);
        } else {
            self.bump(id);
        }
    }

    fn access(&mut self, id: EntryId) {
        debug_assert!(self.classes.tracks(id));
        self.sketch.increment(self.classes.data(id).sketch_hash);
        self.bump(id);
    }

    fn remove(&mut self, id: EntryId) {
        self.detach(id);
    }

    fn chain_ended(&mut self, id: EntryId) {
        self.classes.end_chain(id, FIRST_OUT, &mut self.refused);
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(EntryId) -> bool) -> Option<EntryId> {
        // A parent of resident children is parked: off the lists until its last child leaves,
        // when it returns at its old priority (a fresh tick would keep a cold prefix for as
        // long as a new block). An entry the engine refuses (pinned) is set aside for the rest
        // of the call, so each is looked at once, then put back as just used.
        let mut refused = std::mem::take(&mut self.refused);
        let mut victim = None;
        while let Some(id) = self.lowest() {
            if self.classes.data(id).link.children > 0 && !self.lets_parents_go {
                self.classes.park(id);
            } else if evictable(id) {
                self.victim_first_out = self.classes.list_of(id) == Some(FIRST_OUT);
                self.detach(id);
                victim = Some(id);
                break;
            } else {
                self.classes.unlink(id);
                refused.push(id);
            }
        }
        for &id in &refused {
            self.bump(id);
        }
        refused.clear();
        self.refused = refused;
        victim
    }

    fn victim_has_no_future(&self) -> bool {
        self.victim_first_out
    }

    fn len(&self) -> usize {
        self.len
    }

    fn memory_bytes(&self) -> usize {
        self.classes.capacity_bytes() + self.sketch.bytes()
    }
}

/// A count-min sketch with four 4-bit counters per key, all in one 64-byte block (one cache
/// line per update), whose counters are halved so that old popularity fades (TinyLFU's
/// reset): every block once per `SKETCH_HALVING_PER_ENTRY` increments per tracked entry,
/// after the first as many. The halving sweeps the sketch a page at a time
/// ([`SWEEP_BLOCKS`]) as increments come, not all at once: at 1M entries the sketch is 32
/// MiB, a pass over it some milliseconds inside one use, under the tier's lock. A key's
/// four counters share a block, so they are always halved together.
#[derive(Debug, Default)]
pub(super) struct Sketch {
    /// 64-byte blocks, a power of two of them. Each block is 4 rows of 32 counters, two per
    /// byte.
    blocks: Counters,
    /// Increments between two halvings of a block.
    half_life: u64,
    /// Increments left before the sweep halves its next page.
    until_sweep: u64,
    /// The first block of the page the sweep halves next.
    swept: usize,
}

/// Counters saturate here (4 bits).
pub(super) const SKETCH_MAX: u8 = 15;
/// Tracked entries per 64-byte sketch block: 1 to 2 blocks per 2 entries, so 16 to 32
/// counters per row per entry, 32 to 64 bytes per entry. The uses of two halvings hold
/// about 6 distinct keys per tracked entry on the conversation trace; fewer counters than
/// that inflate the one-off keys' counts and cost hits (2 entries per block: 2.7 points
/// fewer at 10% capacity).
const SKETCH_ENTRIES_PER_BLOCK: usize = 2;
/// Counters are halved every this many increments per tracked entry.
const SKETCH_HALVING_PER_ENTRY: u64 = 5;
/// At least this many blocks (64 KiB).
const SKETCH_MIN_BLOCKS: usize = 1024;
/// Blocks the sweep halves at a time: a 4 KiB page (a microsecond or so).
const SWEEP_BLOCKS: usize = 64;

impl Sketch {
    /// Grows the sketch (starting afresh) for `entries` tracked entries, and sets how often
    /// it halves.
    pub(super) fn fit(&mut self, entries: usize) {
        self.half_life = SKETCH_HALVING_PER_ENTRY * entries.max(SKETCH_MIN_BLOCKS) as u64;
        let want = entries
            .div_ceil(SKETCH_ENTRIES_PER_BLOCK)
            .next_power_of_two()
            .max(SKETCH_MIN_BLOCKS);
        if self.blocks.len() < want {
            self.blocks = Counters::zeroed(want);
            self.swept = 0;
            self.until_sweep = self.half_life;
        }
    }

    /// Increments between two pages of the sweep: one sweep of the whole sketch per
    /// halving.
    fn sweep_step(&self) -> u64 {
        let pages = (self.blocks.len() / SWEEP_BLOCKS).max(1) as u64;
        (self.half_life / pages).max(1)
    }

    /// The block, and for each row the byte and the shift of the key's nibble.
    fn slots(&self, key_hash: u32) -> (usize, [(usize, u32); 4]) {
        let mixed =
            (u64::from(key_hash) ^ 0x5851_f42d_4c95_7f2d).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let block = (mixed >> 32) as usize & (self.blocks.len() - 1);
        let mut slots = [(0, 0); 4];
        for (row, slot) in slots.iter_mut().enumerate() {
            let nibble = ((mixed >> (5 * row + 8)) & 31) as usize;
            *slot = (row * 16 + nibble / 2, (nibble as u32 & 1) * 4);
        }
        (block, slots)
    }

    /// Starts loading the block [`count`](Self::count) of `key_hash` will update.
    pub(super) fn prefetch(&self, key_hash: u32) {
        if !self.blocks.is_empty() {
            let (block, _) = self.slots(key_hash);
            super::prefetch(&self.blocks.block(block)[0]);
        }
    }

    pub(super) fn increment(&mut self, key_hash: u32) {
        self.count(key_hash);
    }

    /// Counts one use of `key_hash` and returns its estimate, this use included (before any
    /// halving the use triggers).
    pub(super) fn count(&mut self, key_hash: u32) -> u8 {
        if self.blocks.is_empty() {
            self.fit(0);
        }
        let (block, slots) = self.slots(key_hash);
        let counters = self.blocks.block_mut(block);
        let mut estimate = SKETCH_MAX;
        for (byte, shift) in slots {
            let counter = (counters[byte] >> shift) & 15;
            if counter < SKETCH_MAX {
                counters[byte] += 1 << shift;
            }
            estimate = estimate.min((counter + 1).min(SKETCH_MAX));
        }
        self.until_sweep = self.until_sweep.saturating_sub(1);
        if self.until_sweep == 0 {
            self.sweep_page();
        }
        estimate
    }

    /// Halves the counters of the sweep's next page of blocks.
    fn sweep_page(&mut self) {
        let start = self.swept;
        let end = (start + SWEEP_BLOCKS).min(self.blocks.len());
        for byte in &mut self.blocks.bytes_mut()[start * 64..end * 64] {
            // Halve both nibbles: shift, then drop what crossed from the high one.
            *byte = (*byte >> 1) & 0x77;
        }
        self.swept = if end == self.blocks.len() { 0 } else { end };
        self.until_sweep = self.sweep_step();
    }

    pub(super) fn estimate(&self, key_hash: u32) -> u8 {
        if self.blocks.is_empty() {
            return 0;
        }
        let (block, slots) = self.slots(key_hash);
        let counters = self.blocks.block(block);
        slots
            .iter()
            .map(|&(byte, shift)| (counters[byte] >> shift) & 15)
            .min()
            .unwrap_or(0)
    }

    /// log2 of the estimate: 0 for a key seen at most once, up to 3.
    fn level(&self, key_hash: u32) -> usize {
        let count = self.estimate(key_hash).max(1);
        (count.ilog2() as usize).min(LEVELS - 1)
    }

    pub(super) fn bytes(&self) -> usize {
        self.blocks.len() * 64
    }

    /// Whether the sketch is larger than a core's own caches (it is then a mapping for huge
    /// pages: see [`Counters`]), so that each update is a miss worth overlapping with others.
    pub(super) fn is_large(&self) -> bool {
        self.bytes() >= HUGE_PAGE_BYTES
    }
}

/// The sketch's 64-byte blocks, as bytes. From 2 MiB on they are an anonymous mapping the
/// kernel is asked to back with transparent huge pages (where THP is `madvise`, the common
/// default, nothing else gets them): every use updates one block at random, and at 1M
/// entries the sketch is 32 MiB, so with 4 KiB pages each update is also a TLB miss, and in
/// a virtual machine a two-level page walk. Smaller, or if the mapping fails, a plain
/// allocation.
#[derive(Debug)]
enum Counters {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
}

impl Default for Counters {
    fn default() -> Self {
        Self::Heap(Vec::new())
    }
}

/// Where a huge page starts to pay.
const HUGE_PAGE_BYTES: usize = 2 << 20;

impl Counters {
    fn zeroed(blocks: usize) -> Self {
        let len = blocks * 64;
        if len >= HUGE_PAGE_BYTES
            && let Ok(map) = memmap2::MmapOptions::new().len(len).map_anon()
        {
            // Only a hint: without huge pages the counters work the same.
            let _ = map.advise(memmap2::Advice::HugePage);
            return Self::Mapped(map);
        }
        Self::Heap(vec![0; len])
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Heap(bytes) => bytes,
            Self::Mapped(map) => map,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::Heap(bytes) => bytes,
            Self::Mapped(map) => map,
        }
    }

    /// Blocks held.
    fn len(&self) -> usize {
        self.bytes().len() / 64
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn block(&self, index: usize) -> &[u8] {
        &self.bytes()[index * 64..][..64]
    }

    fn block_mut(&mut self, index: usize) -> &mut [u8] {
        &mut self.bytes_mut()[index * 64..][..64]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sketch_in_mapped_memory_counts_as_one_on_the_heap() {
        let mut mapped = Sketch::default();
        mapped.fit(1 << 17);
        assert!(matches!(mapped.blocks, Counters::Mapped(_)));
        let mut heap = Sketch {
            blocks: Counters::Heap(vec![0; mapped.blocks.len() * 64]),
            ..Sketch::default()
        };
        heap.half_life = mapped.half_life;
        heap.until_sweep = mapped.until_sweep;
        // Past three sweeps of the halving (one per 5 increments per entry, after the first 5).
        for i in 0..3_000_000u32 {
            let key = i.wrapping_mul(2_654_435_761) % 50_000;
            assert_eq!(mapped.count(key), heap.count(key), "use {i}");
        }
        assert_eq!(mapped.bytes(), heap.bytes());
        assert!((0..50_000).all(|key| mapped.estimate(key) == heap.estimate(key)));
        assert!((0..50_000).any(|key| mapped.estimate(key) > 1));
    }

    fn chain_hint(key_hash: u64, parent: Option<EntryId>, depth: u32) -> EntryHint {
        EntryHint {
            key_hash,
            parent,
            depth,
            partial: false,
        }
    }

    #[test]
    fn an_unused_partial_block_goes_first_and_a_used_one_does_not() {
        let mut p = PrefixAware::default();
        // An unlinked full block 6 as deep as the partial ones, put before two chains
        // 0 -> 1 -> 2 and 3 -> 4 -> 5 that each end in a partial block.
        p.insert(6, chain_hint(60, None, 2));
        for chain in [0, 3] {
            p.insert(chain, chain_hint(u64::from(chain), None, 0));
            p.insert(chain + 1, chain_hint(u64::from(chain + 1), Some(chain), 1));
            let tail = EntryHint {
                partial: true,
                ..chain_hint(u64::from(chain + 2), Some(chain + 1), 2)
            };
            p.insert(chain + 2, tail);
        }
        // The second chain's partial block is used (the same prompt came again).
        p.access(5);
        let order: Vec<_> = (0..7).filter_map(|_| p.pop_victim(&mut |_| true)).collect();
        // The unused partial block goes before the older full block; used, the other is an
        // ordinary leaf, the most recent and most used, so the last leaf to go, and its
        // parents wait for it.
        assert_eq!(order, vec![2, 6, 1, 0, 5, 4, 3]);
    }

    /// Two chains share a head: 0 -> 1 -> 2 -> 3 and 0 -> 4 -> 5, then block 6. The first
    /// chain ends: its own blocks go first, tail first; the shared head stays.
    #[test]
    fn an_ended_chain_goes_first_down_to_where_another_chain_joins() {
        let mut p = PrefixAware::default();
        two_chains_sharing_a_head(&mut p);
        p.chain_ended(3);
        let order: Vec<_> = (0..7).filter_map(|_| p.pop_victim(&mut |_| true)).collect();
        assert_eq!(order, vec![3, 2, 1, 5, 4, 0, 6]);
    }

    /// A chain 0 -> 1 -> 2 -> 3, then an unrelated block 4 used later.
    #[test]
    fn evicts_a_chain_from_its_tail() {
        let mut p = PrefixAware::default();
        for id in 0..4 {
            p.insert(id, chain_hint(u64::from(id), id.checked_sub(1), id));
        }
        p.insert(4, chain_hint(4, None, 0));
        // Using the head (as prefix_match does, head first) must not make it go first.
        for id in 0..4 {
            p.access(id);
        }
        let order: Vec<_> = (0..5).filter_map(|_| p.pop_victim(&mut |_| true)).collect();
        assert_eq!(order, vec![4, 3, 2, 1, 0]);
    }

    /// Inserts 0 -> 1 -> 2 -> 3 and 0 -> 4 -> 5, then block 6.
    fn two_chains_sharing_a_head(p: &mut PrefixAware) {
        for id in 0..4 {
            p.insert(id, chain_hint(u64::from(id), id.checked_sub(1), id));
        }
        p.insert(4, chain_hint(4, Some(0), 1));
        p.insert(5, chain_hint(5, Some(4), 2));
        p.insert(6, chain_hint(6, None, 0));
    }

    /// Inserts 0 -> 1, then uses 1 five times.
    fn cold_parent_of_a_hot_child(p: &mut PrefixAware) {
        p.insert(0, chain_hint(10, None, 0));
        p.insert(1, chain_hint(11, Some(0), 1));
        for _ in 0..5 {
            p.access(1);
        }
        assert_eq!(p.children(0), 1);
    }

    #[test]
    fn a_parent_waits_for_its_children_even_when_colder() {
        let mut p = PrefixAware::default();
        cold_parent_of_a_hot_child(&mut p);
        assert_eq!(p.pop_victim(&mut |_| true), Some(1));
        assert_eq!(p.children(0), 0);
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
    }

    /// A cluster member's setting: the colder parent goes first, and ending a chain still
    /// walks its links up to where another chain joins.
    #[test]
    fn letting_parents_go_ranks_a_parent_as_any_block_and_still_ends_chains() {
        let mut p = PrefixAware::letting_parents_go();
        cold_parent_of_a_hot_child(&mut p);
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
        assert_eq!(p.pop_victim(&mut |_| true), Some(1));

        let mut p = PrefixAware::letting_parents_go();
        two_chains_sharing_a_head(&mut p);
        p.chain_ended(3);
        let first: Vec<_> = (0..3).filter_map(|_| p.pop_victim(&mut |_| true)).collect();
        assert_eq!(first, vec![3, 2, 1]);
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn frequent_keys_outlive_recent_one_offs() {
        let mut p = PrefixAware::default();
        // Key 7 was used often before, under an entry that was then evicted.
        p.insert(0, chain_hint(7, None, 0));
        for _ in 0..6 {
            p.access(0);
        }
        assert_eq!(p.pop_victim(&mut |_| true), Some(0));
        p.insert(0, chain_hint(7, None, 0));
        for id in 1..100 {
            p.insert(id, chain_hint(1000 + u64::from(id), None, 0));
        }
        // The sketch remembers key 7: every one-off goes first.
        let order: Vec<_> = (0..100)
            .filter_map(|_| p.pop_victim(&mut |_| true))
            .collect();
        assert_eq!(order.last(), Some(&0));
    }

    #[test]
    fn a_stale_child_does_not_touch_a_reused_parent_id() {
        let mut p = PrefixAware::default();
        p.insert(0, chain_hint(1, None, 0));
        p.insert(1, chain_hint(2, Some(0), 1));
        p.remove(0); // the parent leaves for a reason of its own
        p.insert(0, chain_hint(3, None, 0)); // its id is reused
        p.insert(2, chain_hint(4, Some(0), 1));
        assert_eq!(p.children(0), 1);
        p.remove(1); // the old child leaves: the new entry 0 keeps its count
        assert_eq!(p.children(0), 1);
    }

    /// The aging halves one page of blocks per step, never the whole sketch inside one use,
    /// and every block exactly once per halving.
    #[test]
    fn the_sweep_halves_a_page_at_a_time_and_every_block_once_per_halving() {
        let mut s = Sketch::default();
        s.fit(1 << 12);
        let pages = s.blocks.len() / SWEEP_BLOCKS;
        assert!(pages > 2, "{pages} pages");
        // Every counter saturated: counting a key changes no counter, halving one shows.
        s.blocks.bytes_mut().fill(0xff);
        let key = 7;
        let (own, _) = s.slots(key);
        let others = |s: &Sketch, value: u8| {
            (0..s.blocks.len())
                .filter(|&block| block != own)
                .filter(|&block| s.blocks.block(block).iter().all(|&b| b == value))
                .count()
        };
        for _ in 1..s.until_sweep {
            s.count(key);
        }
        assert_eq!(
            others(&s, 0xff),
            s.blocks.len() - 1,
            "halved before its time"
        );
        s.count(key);
        let first_page = SWEEP_BLOCKS - usize::from(own < SWEEP_BLOCKS);
        assert_eq!(others(&s, 0x77), first_page, "one page halved");
        for _ in 0..(pages as u64 - 1) * s.sweep_step() {
            s.count(key);
        }
        assert_eq!(
            others(&s, 0x77),
            s.blocks.len() - 1,
            "each block halved once"
        );
    }

    #[test]
    fn sketch_counts_and_ages() {
        let mut s = Sketch::default();
        s.fit(10);
        assert_eq!(s.level(42), 0);
        for _ in 0..3 {
            s.increment(42);
        }
        assert_eq!(s.estimate(42), 3);
        assert_eq!(s.level(42), 1);
        for _ in 0..20 {
            s.increment(42);
        }
        assert_eq!(s.estimate(42), SKETCH_MAX);
        assert_eq!(s.level(42), LEVELS - 1);
        // Enough other increments halve everything.
        for k in 0..2 * s.half_life {
            s.increment(1_000_000 + k as u32);
        }
        assert!(s.estimate(42) <= SKETCH_MAX / 2 + 1, "{}", s.estimate(42));
    }
}
