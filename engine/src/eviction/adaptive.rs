//! The default policy: ARC's balance of recency and frequency, learnt online, with the rules
//! a prefix chain gives for free.
//!
//! Adaptive Replacement Cache (Megiddo and Modha, FAST 2003) splits the resident blocks in
//! two: `recent`, seen once lately, and `frequent`, seen at least twice. A ghost list behind
//! each remembers the keys it let go of (32-bit fingerprints, no bytes). A target `p` says
//! how much of the cache `recent` may hold: space is taken from `recent` while it holds more
//! than `p`, else from `frequent`. A block that comes back while its key is in `recent`'s
//! ghost was let go too soon for its reuse distance: `p` grows (the workload wants recency,
//! LRU's strength). One that comes back from `frequent`'s ghost: `p` shrinks (it wants the
//! frequent set kept through scans of one-off blocks: S3-FIFO's and LFU's strength). Either
//! way it returns into `frequent`. The step is ARC's (the ratio of the two ghosts' sizes, at
//! least one block), the target starts at half the cache (ARC starts at none of it, a lean
//! towards frequency that a large cache takes long to unlearn), and every bound is the
//! cache's own size.
//!
//! `recent` is ordered by last use. `frequent` is too (ARC's order), or by uses: CLOCK's
//! two bits, as S3-FIFO's main queue, where the oldest block goes round again while it has
//! uses left ([`FrequentOrder`]). Neither wins everywhere: popular prompts of Zipf
//! popularity are kept better by uses, growing conversations far better by recency. Two
//! miniature copies of the policy, one per order, are fed the uses of a fixed sample of the
//! keys (SHARDS: at most 4,096 blocks each, the same share of the cache's size) and the
//! cache takes the order of the one that hit more lately. Nothing is tried on the real cache
//! to be judged.
//!
//! Ghost hits move the target one block (or ARC's ratio) at a time, and only where keys
//! come back from a ghost: on popular prompts of Zipf popularity in a large cache, which want
//! a small recent side, it was still falling from half the cache at the end of a trace of
//! 50,000 requests. Two more miniatures duel over the split: the real cache's order, with a
//! recent side a fifth of the cache smaller and a fifth larger than the real target. While
//! one hits more lately, the real target moves towards it, one block per 16 uses of the real
//! cache (each sampled use moving it 2^k / 16 blocks). Ghost hits still move it too: the duel
//! sees a gradient only where the two spreads keep different blocks, the ghosts see keys let
//! go a little too soon wherever the target is.
//!
//! One addition to ARC: a new block whose key a count-min sketch has seen before (the sketch
//! of [`PrefixAware`], which remembers about ten cache-sizes of uses, longer than the ghosts'
//! one) starts in `frequent`, if seen at least as often as the block `frequent` would let go
//! next (TinyLFU's admission). A conversation that returns after a long pause is kept ahead
//! of one-off blocks (on the production trace 4.9 points of hits at 2% capacity), and on a
//! small cache of Zipf-popular prompts keys seen a second time do not push out keys seen
//! many times.
//!
//! On top, what the prefix structure gives without learning, as in [`PrefixAware`]:
//! - a block with a resident child is not evicted before that child (`prefix_match` stops
//!   at the first missing block, so the child would be dead weight): it is parked, and
//!   returns to the end of its list when its last child leaves;
//! - a chain's partial last block not used since its put, and the blocks of a chain its
//!   caller ended, go before all others (their keys are not remembered as ghosts: they were
//!   let go on purpose, not too soon).
//!
//! Every operation is O(1), amortized under CLOCK (a block goes round at most once per use):
//! a probe of the ghost table and a sketch update on insert, list moves otherwise, and for a
//! sampled key (all of them below 4,096 blocks, 1 in 2^k above) the same in each miniature.
//! Where the sketch is larger than a core's caches (2 MiB, over 32,768 blocks), uses are
//! applied 32 at a time, so that their cache misses overlap: a hit moves its block when its
//! batch is applied, and a new block waits in `recent` until then, its key counted and
//! looked up among the ghosts with the batch (up to 31 uses late). A block used while it
//! waits is never evicted for it: the batch is applied first.
//! 36 bytes per resident block (its list entry), 32 to 64 of sketch, at most one ghost per
//! resident block (4 bytes in its queue, 8 to 16 in its table: see
//! [`ghosts`](super::ghosts)), and the miniatures (at most 4 x 4,096 blocks, about two bytes
//! per block at 1M): 95 bytes per block at 1M blocks after a run of evictions (the
//! eviction bench). Below 4,096 blocks the miniatures are whole copies: five times the
//! work and memory of one policy, on a cache that small.
//!
//! [`PrefixAware`]: super::PrefixAware

use hashbrown::HashMap;

use super::chain::{ChainLink, Linked};
use super::ghosts::{Ghosts, Returning};
use super::lists::Lists;
use super::{EntryHint, EntryId, EvictionPolicy};

/// Blocks seen once lately.
pub(super) const RECENT: usize = 0;
/// Blocks seen at least twice.
pub(super) const FREQUENT: usize = 1;
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
    /// Uses since it became frequent, less the rounds it was kept for them (at most
    /// [`MAX_USES`]; only [`FrequentOrder::Clock`] looks at them).
    uses: u8,
}

/// A frequent block earns at most this many rounds past the end of its list (S3-FIFO's and
/// CLOCK's two bits).
const MAX_USES: u8 = 3;

/// Uses applied together where the sketch is large ([`Adaptive::batches`]).
const SKETCH_BATCH: usize = 32;
/// How far ahead of applying a use of a batch its lines are asked for. All 32 at once left
/// more of them still on their way when their turn came (an eviction with its insert at 1M
/// blocks: 8 ahead, 243 and 278 ns against 287 and 302 all at once, alternated).
const ASK_AHEAD: usize = 8;

/// A use held for its batch.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// A hit on the entry: nothing of it applied yet (the lists, its uses, the sketch, the
    /// shadows).
    Hit(EntryId),
    /// An insert of `fingerprint` as `id`, whose `generation` it was: put in `recent` (or
    /// first out) at once, the sketch yet to count it; it moves to `frequent` if its key
    /// comes back from a ghost or the sketch has seen it before (and it is still that
    /// entry, still recent).
    Insert {
        fingerprint: u32,
        id: EntryId,
        generation: u32,
    },
}

/// What does not move [`Adaptive`]'s target (both do, but in tests).
#[derive(Debug, Clone, Copy, Default)]
struct Ignores {
    /// Hits on evicted keys (ARC's adaptation).
    ghosts: bool,
    /// The shadows' split duel.
    duel: bool,
}

/// How the frequent segment orders its blocks for eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrequentOrder {
    /// By last use (ARC's order): the least recently used block goes.
    #[default]
    Recency,
    /// By uses (CLOCK): the least recently used block goes only if it has no use left;
    /// one with uses left spends one and goes round again, as S3-FIFO's main queue does.
    Clock,
}

impl Linked for Meta {
    fn link(&self) -> &ChainLink {
        &self.link
    }
    fn link_mut(&mut self) -> &mut ChainLink {
        &mut self.link
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
    /// The frequent segment's order now.
    order: FrequentOrder,
    /// Two miniature copies of this policy, one per [`FrequentOrder`], that choose `order`
    /// (none in a miniature, nor until the first insert).
    shadows: Option<Box<Shadows>>,
    /// A miniature: it has no shadows of its own.
    miniature: bool,
    /// Nothing moves the target or changes the order: in the split duel's miniatures, whose
    /// targets are set from outside, and in tests (what adapting buys).
    frozen: bool,
    /// What does not move the target (only in tests: what each way of moving it buys).
    target_ignores: Ignores,
    /// Uses held for a batch where the sketch is large, at most [`SKETCH_BATCH`].
    pending: Vec<Pending>,
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

    /// The frequent segment's order now.
    pub fn frequent_order(&self) -> FrequentOrder {
        self.order
    }

    /// Feeds a use of `fingerprint` (a hit, or an insert under the block `parent`) to the
    /// shadows, and takes the order they prefer.
    fn observe(&mut self, fingerprint: u32, parent: Option<u32>, partial: bool) {
        if self.miniature || self.frozen {
            return;
        }
        let len = self.len();
        let target = self.target_recent();
        let lets_parents_go = self.lets_parents_go;
        let shadows = self
            .shadows
            .get_or_insert_with(|| Box::new(Shadows::new(lets_parents_go)));
        let verdict = shadows.observe(fingerprint, parent, partial, len, target, self.order);
        if let Some(order) = verdict.order {
            self.order = order;
        }
        if verdict.target_step != 0 && !self.target_ignores.duel {
            let target = target.saturating_add_signed(verdict.target_step).min(len);
            self.target_recent = Some(target);
        }
    }

    /// The target share of the recent segment, in entries.
    pub fn target_recent(&self) -> usize {
        self.target_recent.unwrap_or(self.len() / 2)
    }

    /// Puts `id` (unlisted) at the front of `segment`, counting it there.
    fn place(&mut self, id: EntryId, segment: usize) {
        self.count_in(id, segment);
        self.lists.push_front(segment, id);
    }

    /// Counts `id` in `segment`, wherever it is listed (or parked).
    fn count_in(&mut self, id: EntryId, segment: usize) {
        let meta = self.lists.data_mut(id);
        let old = usize::from(meta.segment);
        meta.segment = segment as u8;
        self.segment_lens[old] -= 1;
        self.segment_lens[segment] += 1;
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
        if self.frozen || self.target_ignores.ghosts {
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

    /// Whether a new block whose key the sketch has counted `count` times (this use
    /// included) starts in `frequent`: seen before, and at least as often as the block
    /// `frequent` lets go next (TinyLFU's admission, Einziger et al., 2017). Otherwise, on a
    /// small cache of Zipf-popular prompts, keys seen a second time push out keys seen far
    /// more often (up to 1.8 points of hits at 2% capacity).
    fn seen_enough(&self, count: u8) -> bool {
        count >= 2
            && self
                .lists
                .back(FREQUENT)
                .is_none_or(|next| count >= self.sketch.estimate(self.lists.data(next).fingerprint))
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

    /// Whether uses wait to be counted in batches: where the sketch is larger than a core's
    /// caches (2 MiB). Each use then lands in a random 64-byte block of it, a cache miss and a
    /// TLB miss, and so does an insert's probe of the ghost table (twice the cache's size of
    /// slots): asked for [`SKETCH_BATCH`] at a time, their misses overlap where one at a time
    /// waits for each in turn.
    fn batches(&self) -> bool {
        self.sketch.is_large()
    }

    /// Holds `use_` for its batch, and applies the batch once it is full.
    fn hold(&mut self, use_: Pending) {
        self.pending.push(use_);
        if self.pending.len() >= SKETCH_BATCH {
            self.apply_pending();
        }
    }

    /// Whether a hit on `id` waits in the batch.
    fn hit_pending(&self, id: EntryId) -> bool {
        self.pending
            .iter()
            .any(|use_| matches!(*use_, Pending::Hit(hit) if hit == id))
    }

    /// A hit, applied: `id` goes to the front of `frequent` (one more use if it was there),
    /// and the sketch and the shadows count it.
    fn hit(&mut self, id: EntryId) {
        let meta = self.lists.data_mut(id);
        meta.uses = if usize::from(meta.segment) == FREQUENT {
            (meta.uses + 1).min(MAX_USES)
        } else {
            0 // the use that makes it frequent
        };
        let fingerprint = meta.fingerprint;
        self.lists.unlist(id);
        self.place(id, FREQUENT);
        self.sketch.increment(fingerprint);
        self.observe(fingerprint, None, false);
    }

    /// Starts loading what applying `use_` touches: a hit's neighbours (its entry was asked
    /// for when it came) and its block of the sketch; an insert's block of the sketch and
    /// ghost slot.
    fn ask_for(&self, use_: Pending) {
        match use_ {
            Pending::Hit(id) => {
                self.lists.prefetch_neighbours(id);
                self.sketch.prefetch(self.lists.data(id).fingerprint);
            }
            Pending::Insert { fingerprint, .. } => {
                self.sketch.prefetch(fingerprint);
                self.ghosts.prefetch(fingerprint);
            }
        }
    }

    /// Applies the uses held for a batch, in the order they came, each one's cache misses
    /// asked for [`ASK_AHEAD`] uses before it is applied ([`ask_for`](Self::ask_for)). A
    /// hit does then what it does when not batching. Each new entry that is still the same
    /// entry is placed as an insert places it when not batching: in `frequent` if its key
    /// comes back from a ghost (which moves the target) or the sketch has seen it before,
    /// unless a use got there first. It waited in `recent` (or first out) meanwhile:
    /// up to [`SKETCH_BATCH`] - 1 uses late. An entry gone before its batch is not asked
    /// after: it was remembered as a ghost when it went, in place of the one it had. (A hit
    /// never outlives its entry: removing the entry, ending its chain or evicting it applies
    /// the batch first.)
    fn apply_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        for use_ in pending.iter().take(ASK_AHEAD) {
            self.ask_for(*use_);
        }
        for (i, use_) in pending.iter().enumerate() {
            if let Some(later) = pending.get(i + ASK_AHEAD) {
                self.ask_for(*later);
            }
            let (fingerprint, id, generation) = match *use_ {
                Pending::Hit(id) => {
                    self.hit(id);
                    continue;
                }
                Pending::Insert {
                    fingerprint,
                    id,
                    generation,
                } => (fingerprint, id, generation),
            };
            let count = self.sketch.count(fingerprint);
            let seen = self.seen_enough(count);
            if !self.lists.tracks(id) || self.lists.data(id).link.generation() != generation {
                continue;
            }
            let returning = self.ghosts.take(fingerprint);
            if let Some(Returning {
                segment,
                evicted: true,
            }) = returning
            {
                self.adapt(segment);
            }
            if !(seen || returning.is_some()) || usize::from(self.lists.data(id).segment) != RECENT
            {
                continue;
            }
            if self.lists.list_of(id) == Some(RECENT) {
                self.lists.unlink(id);
                self.place(id, FREQUENT);
            } else {
                // First out (a partial block, or its chain ended since) or parked: it stays
                // where it is, counted in `frequent`. (A partial block back from a ghost
                // stays first out, where an insert not batched would list it in `frequent`:
                // its list cannot tell it from an ended chain's block. Rare: few partial
                // blocks are used again.)
                self.count_in(id, FREQUENT);
            }
        }
        pending.clear();
        self.pending = pending;
        // No ghost to trim: taking ghosts and moving entries out of `recent` only loosen
        // the bounds.
    }

    #[cfg(test)]
    fn freeze(&mut self) {
        self.frozen = true;
    }

    /// The frequent order stays as it is, and the target moves by ghost hits alone: no
    /// shadows judge them.
    #[cfg(test)]
    fn without_shadows(&mut self) {
        self.miniature = true;
    }

    /// What no longer moves the target: ghost hits (ARC's way), the split duel, or both (the
    /// shadows still choose the order).
    #[cfg(test)]
    fn target_ignoring(&mut self, ghosts: bool, duel: bool) {
        self.target_ignores = Ignores { ghosts, duel };
    }
}

impl EvictionPolicy for Adaptive {
    fn insert(&mut self, id: EntryId, hint: EntryHint) {
        self.lists.grow_to(id);
        assert!(!self.lists.tracks(id), "entry {id} inserted twice");
        let link = self.lists.new_link(id, hint.parent);
        let fingerprint = (hint.key_hash ^ (hint.key_hash >> 32)) as u32;
        self.sketch.fit(self.len() + 1);
        let batched = self.batches();
        if !batched {
            // The sketch's block and the ghost table's slot, loaded side by side.
            self.sketch.prefetch(fingerprint);
            self.ghosts.prefetch(fingerprint);
        }
        let parent_fingerprint = hint
            .parent
            .filter(|&p| p != id && self.lists.tracks(p))
            .map(|p| self.lists.data(p).fingerprint);
        // Back from a ghost, or seen before within the sketch's memory, which outlasts the
        // ghosts': both asked now, or with the batch (held below, once the entry is placed).
        let (returning, seen) = if batched {
            (None, false)
        } else {
            let returning = self.ghosts.take(fingerprint);
            let count = self.sketch.count(fingerprint);
            (returning, self.seen_enough(count))
        };
        let segment = if returning.is_some() || seen {
            FREQUENT
        } else {
            RECENT
        };
        *self.lists.data_mut(id) = Meta {
            fingerprint,
            link,
            segment: segment as u8,
            uses: 0,
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
        if batched {
            self.hold(Pending::Insert {
                fingerprint,
                id,
                generation: link.generation(),
            });
        }
        self.observe(fingerprint, parent_fingerprint, hint.partial);
    }

    fn access(&mut self, id: EntryId) {
        debug_assert!(self.lists.tracks(id));
        if self.batches() {
            // The entry is a cache miss, and so are its neighbours once it is read: asked
            // for now, read with the batch.
            self.lists.prefetch(id);
            self.hold(Pending::Hit(id));
            return;
        }
        // The sketch's block loads while the lists take the entry out (its neighbours are
        // misses too).
        self.sketch.prefetch(self.lists.data(id).fingerprint);
        self.hit(id);
    }

    fn remove(&mut self, id: EntryId) {
        if self.hit_pending(id) {
            self.apply_pending();
        }
        // Remembered, so a key put again (overwritten) comes back as seen before.
        let meta = *self.lists.data(id);
        self.detach(id);
        self.ghosts
            .remember(usize::from(meta.segment), meta.fingerprint, false);
        self.trim_ghosts();
        if let Some(shadows) = &mut self.shadows {
            shadows.forget(meta.fingerprint);
        }
    }

    fn chain_ended(&mut self, id: EntryId) {
        // A use held for its batch came before the end: it goes first.
        if !self.pending.is_empty() {
            self.apply_pending();
        }
        self.lists.end_chain(id, FIRST_OUT, &mut self.refused);
    }

    fn pop_victim(&mut self, evictable: &mut dyn FnMut(EntryId) -> bool) -> Option<EntryId> {
        // A parent of resident children is parked until its last child leaves. An entry the
        // engine refuses (pinned) is set aside for the rest of the call, so each is looked at
        // once, then put back as just used in its segment.
        let mut refused = std::mem::take(&mut self.refused);
        let mut victim = None;
        // What the trim after the eviction probes, loaded while the lists are walked.
        self.ghosts.prefetch_oldest();
        while let Some(list) = self.next_list() {
            let Some(id) = self.lists.back(list) else {
                break;
            };
            if self.hit_pending(id) {
                // Used since it came to the end of its list: not a victim once that use
                // is applied.
                self.apply_pending();
                continue;
            }
            let uses = self.lists.data(id).uses;
            if self.lists.data(id).link.children > 0 && !self.lets_parents_go {
                self.lists.park(id);
            } else if list == FREQUENT && uses > 0 && self.order == FrequentOrder::Clock {
                self.lists.data_mut(id).uses = uses - 1;
                self.lists.move_to_front(FREQUENT, id);
            } else if evictable(id) {
                self.victim_first_out = list == FIRST_OUT;
                let meta = *self.lists.data(id);
                self.detach(id);
                if list != FIRST_OUT {
                    self.ghosts
                        .remember(usize::from(meta.segment), meta.fingerprint, true);
                }
                // Likely the next victim (the insert that follows leaves the balance as it
                // was): its entry is in the cache, as taking this one wrote it, so what
                // taking it will touch is asked for now, its neighbour and its ghost slot.
                if let Some(next) = self.lists.back(list) {
                    self.lists.prefetch_prev(next);
                    self.ghosts.prefetch(self.lists.data(next).fingerprint);
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
        self.lists.capacity_bytes()
            + self.ghosts.bytes()
            + self.sketch.bytes()
            + self.pending.capacity() * size_of::<Pending>()
            + self.shadows.as_ref().map_or(0, |s| s.bytes())
    }
}

/// Miniature caches fed the uses of a sample of the keys (a fixed share of the key hash
/// space, so a sampled key is always sampled: SHARDS, Waldspurger et al., FAST 2015) at the
/// same share of the real cache's size, in two duels: one per [`FrequentOrder`], whose
/// winner the real cache's frequent side follows, and one over the target, between a recent
/// side [`SPLIT_SPREAD`](Shadows::SPLIT_SPREAD) of the cache smaller and one as much larger
/// than the real cache's, towards whose winner the target moves. Neither order, nor any
/// target, has to be tried on the real cache to be judged, and the choice is the
/// workload's, not a constant's.
#[derive(Debug)]
struct Shadows {
    /// Frequent side by [`FrequentOrder::Recency`], and by [`FrequentOrder::Clock`]; each
    /// moves its own target by its ghost hits, as the real cache does.
    orders: Duel,
    /// The real cache's order and target, the target held a spread below, and above.
    splits: Duel,
    /// The sample is the key hashes whose top `shift` bits are zero: 1 in 2^shift.
    shift: u32,
    /// The split duel's moves of the target not yet made: a fraction of a block.
    carry: f64,
}

/// What the shadows make of a use.
struct Verdict {
    /// The frequent order to switch to, if the shadows now prefer the other one.
    order: Option<FrequentOrder>,
    /// Blocks to move the target by.
    target_step: isize,
}

impl Shadows {
    fn new(lets_parents_go: bool) -> Self {
        let fixed_split = || Adaptive {
            frozen: true,
            ..Mini::new_policy(FrequentOrder::Recency, lets_parents_go)
        };
        Self {
            orders: Duel::new([
                Mini::over(Mini::new_policy(FrequentOrder::Recency, lets_parents_go)),
                Mini::over(Mini::new_policy(FrequentOrder::Clock, lets_parents_go)),
            ]),
            splits: Duel::new([Mini::over(fixed_split()), Mini::over(fixed_split())]),
            shift: 0,
            carry: 0.0,
        }
    }

    /// A miniature holds at most this many blocks: enough that its hit ratio follows the
    /// real cache's (SHARDS' error is well under a point at a few thousand sampled blocks).
    const MAX_BLOCKS: usize = 4096;
    /// How much smaller and larger than the real cache's the split duel's recent sides are,
    /// in shares of the cache. Far enough apart that the two keep measurably different
    /// blocks: of 0.05, 0.1, 0.15, 0.2 and 0.3 on the traces of docs/engine.md, 0.05 and
    /// 0.1 left Zipf-popular prompts at 20% capacity up to 1.1 points below S3-FIFO, and
    /// 0.3 cost the production trace 0.5 points at 20%.
    const SPLIT_SPREAD: f64 = 0.2;
    /// While one side of the split duel leads, the target moves towards it one block per
    /// this many uses of the real cache (2^shift / PACE blocks per sampled use), so it
    /// crosses the cache in this many cache-sizes of uses, twice the span the scores
    /// remember. Of 4, 8, 16 and 32: 8 and faster lost 2.1 points to LRU on a hot set that
    /// changes four times, 32 left Zipf-popular prompts 0.5 points below S3-FIFO.
    const SPLIT_PACE: f64 = 16.0;

    fn sampled(fingerprint: u32, shift: u32) -> bool {
        shift == 0 || fingerprint.wrapping_mul(0x9e37_79b1) >> (32 - shift) == 0
    }

    /// A use of `fingerprint` when the real cache holds `len` blocks, its target is
    /// `target` and its frequent order `current_order`.
    fn observe(
        &mut self,
        fingerprint: u32,
        parent: Option<u32>,
        partial: bool,
        len: usize,
        target: usize,
        current_order: FrequentOrder,
    ) -> Verdict {
        let mut shift = self.shift;
        while (len >> shift) > Self::MAX_BLOCKS {
            shift += 1;
        }
        if shift != self.shift {
            self.shift = shift;
            let sampled = |fingerprint| Self::sampled(fingerprint, shift);
            self.orders.keep_only(sampled);
            self.splits.keep_only(sampled);
        }
        if !Self::sampled(fingerprint, shift) {
            return Verdict {
                order: None,
                target_step: 0,
            };
        }
        let capacity = (len >> shift).max(1);
        let order = self
            .orders
            .touch(fingerprint, parent, partial, capacity)
            .map(|winner| [FrequentOrder::Recency, FrequentOrder::Clock][winner]);

        // The real cache's split, a spread either side, in the miniature's blocks.
        let share = target as f64 / len.max(1) as f64;
        let spread = [-Self::SPLIT_SPREAD, Self::SPLIT_SPREAD];
        for (mini, spread) in self.splits.minis.iter_mut().zip(spread) {
            let share = (share + spread).clamp(0.0, 1.0);
            mini.policy.order = order.unwrap_or(current_order);
            mini.policy.target_recent = Some((share * capacity as f64).round() as usize);
        }
        let step = (1u64 << shift) as f64 / Self::SPLIT_PACE;
        match self.splits.touch(fingerprint, parent, partial, capacity) {
            Some(0) => self.carry -= step,
            Some(_) => self.carry += step,
            None => {}
        }
        let target_step = self.carry.trunc();
        self.carry -= target_step;
        Verdict {
            order,
            target_step: target_step as isize,
        }
    }

    fn forget(&mut self, fingerprint: u32) {
        self.orders.forget(fingerprint);
        self.splits.forget(fingerprint);
    }

    fn bytes(&self) -> usize {
        self.orders.bytes() + self.splits.bytes()
    }
}

/// Two miniatures fed the same uses, and which has kept more of them lately.
#[derive(Debug)]
struct Duel {
    minis: [Mini; 2],
    /// Hits per miniature, each older one weighing less (about the last
    /// [`Duel::WINDOW_SIZES`] miniature sizes of uses count).
    scores: [f64; 2],
}

impl Duel {
    /// How many miniature-sizes of recent uses the scores remember.
    const WINDOW_SIZES: f64 = 8.0;
    /// One must keep this much more (relative) than the other to lead, so sampling noise
    /// does not flip the lead back and forth.
    const MARGIN: f64 = 0.02;

    fn new(minis: [Mini; 2]) -> Self {
        Self {
            minis,
            scores: [0.0; 2],
        }
    }

    /// Feeds a use to both miniatures, each with room for `capacity` blocks: the index of
    /// the one that leads now, if one does.
    fn touch(
        &mut self,
        fingerprint: u32,
        parent: Option<u32>,
        partial: bool,
        capacity: usize,
    ) -> Option<usize> {
        let keep = 1.0 - 1.0 / (Self::WINDOW_SIZES * capacity as f64);
        for (mini, score) in self.minis.iter_mut().zip(&mut self.scores) {
            let hit = mini.touch(fingerprint, parent, partial, capacity);
            *score = *score * keep + f64::from(u8::from(hit));
        }
        let [first, second] = self.scores;
        if first > second * (1.0 + Self::MARGIN) {
            Some(0)
        } else if second > first * (1.0 + Self::MARGIN) {
            Some(1)
        } else {
            None
        }
    }

    fn keep_only(&mut self, keep: impl Fn(u32) -> bool) {
        for mini in &mut self.minis {
            mini.keep_only(&keep);
        }
    }

    fn forget(&mut self, fingerprint: u32) {
        for mini in &mut self.minis {
            mini.forget(fingerprint);
        }
    }

    fn bytes(&self) -> usize {
        self.minis.iter().map(Mini::bytes).sum()
    }
}

/// A cache of sampled keys over a miniature [`Adaptive`] with a fixed frequent order.
#[derive(Debug)]
struct Mini {
    policy: Adaptive,
    held: HashMap<u32, EntryId>,
    /// Fingerprint per entry id.
    keys: Vec<u32>,
    free: Vec<EntryId>,
}

impl Mini {
    /// The policy of a miniature whose frequent side starts in `order`.
    fn new_policy(order: FrequentOrder, lets_parents_go: bool) -> Adaptive {
        Adaptive {
            order,
            miniature: true,
            lets_parents_go,
            ..Adaptive::default()
        }
    }

    /// A cache over `policy`.
    fn over(policy: Adaptive) -> Self {
        Self {
            policy,
            held: HashMap::new(),
            keys: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Uses `fingerprint` (inserted under `parent` when missing; a parent not sampled is
    /// none) with room for `capacity` blocks: whether it was held.
    fn touch(
        &mut self,
        fingerprint: u32,
        parent: Option<u32>,
        partial: bool,
        capacity: usize,
    ) -> bool {
        if let Some(&id) = self.held.get(&fingerprint) {
            self.policy.access(id);
            return true;
        }
        // As the engine does: room is made before the block goes in, and not by evicting the
        // block before it in its chain (a chain put pins that one).
        let parent = parent.and_then(|p| self.held.get(&p).copied());
        while self.policy.len() >= capacity {
            let Some(victim) = self.policy.pop_victim(&mut |entry| Some(entry) != parent) else {
                break;
            };
            self.held.remove(&self.keys[victim as usize]);
            self.free.push(victim);
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.keys.push(0);
            (self.keys.len() - 1) as EntryId
        });
        self.keys[id as usize] = fingerprint;
        self.policy.insert(
            id,
            EntryHint {
                key_hash: u64::from(fingerprint),
                parent,
                partial,
                ..EntryHint::default()
            },
        );
        self.held.insert(fingerprint, id);
        false
    }

    fn forget(&mut self, fingerprint: u32) {
        if let Some(id) = self.held.remove(&fingerprint) {
            self.policy.remove(id);
            self.free.push(id);
        }
    }

    fn keep_only(&mut self, keep: impl Fn(u32) -> bool) {
        let gone: Vec<u32> = self.held.keys().copied().filter(|&f| !keep(f)).collect();
        for fingerprint in gone {
            self.forget(fingerprint);
        }
    }

    fn bytes(&self) -> usize {
        self.policy.memory_bytes()
            + self.held.capacity() * (size_of::<(u32, EntryId)>() + 1)
            + (self.keys.capacity() + self.free.capacity()) * size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `capacity` blocks over `Adaptive`, used as the replay uses a policy: a key
    /// held is a hit (an access), a key not held is put (an insert), evicting as needed.
    struct Cache {
        mini: Mini,
        capacity: usize,
    }

    impl Cache {
        fn new(capacity: usize) -> Self {
            Self {
                mini: Mini::over(Adaptive::default()),
                capacity,
            }
        }

        fn policy(&mut self) -> &mut Adaptive {
            &mut self.mini.policy
        }

        /// Uses `key`: whether it was held.
        fn touch(&mut self, key: u64) -> bool {
            // Keys spread over the fingerprints (the policy's 32-bit view of a key).
            let key_hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let fingerprint = (key_hash ^ (key_hash >> 32)) as u32;
            self.mini.touch(fingerprint, None, false, self.capacity)
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
            cache.policy().freeze();
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
        assert!(cache.policy().target_recent() > CAPACITY / 2);
        if frozen {
            cache.policy().freeze();
        }
        let rounds = 20;
        let hits = hot_set_through_a_scan(&mut cache, rounds);
        (hits, rounds * CAPACITY as u64 / 2)
    }

    /// A hot set of 3/5 of the cache used in turn (three times in a row), each followed by
    /// two keys used twice in a row and never again: both are frequent, only the hot keys
    /// come back. By recency the pairs push the hot set out; by uses they go first. Returns
    /// the hits on the hot set when it comes back.
    fn hot_set_among_pairs(cache: &mut Cache, rounds: u64) -> u64 {
        let hot = 3 * CAPACITY as u64 / 5;
        let mut pair = 300_000_000;
        let mut hits = 0;
        for _ in 0..rounds {
            for key in 0..hot {
                hits += u64::from(cache.touch(5_000_000 + key));
                cache.touch(5_000_000 + key);
                cache.touch(5_000_000 + key);
                for _ in 0..2 {
                    cache.touch(pair);
                    cache.touch(pair);
                    pair += 1;
                }
            }
        }
        hits
    }

    /// Conversations: 60 open at a time, each turn re-reading its whole context and adding
    /// two blocks; one in ten turns ends its conversation and a new one opens. Returns the
    /// hits over `turns` turns.
    fn conversations(cache: &mut Cache, rng: &mut impl rand::Rng, turns: u64) -> u64 {
        let mut open: Vec<(u64, u64)> = (0..60).map(|c| (c, 2)).collect();
        let mut next = 60;
        let mut hits = 0;
        for _ in 0..turns {
            let slot = rng.random_range(0..open.len());
            let (conversation, blocks) = open[slot];
            for block in 0..blocks + 2 {
                hits += u64::from(cache.touch(200_000_000 + conversation * 1_000 + block));
            }
            open[slot] = if rng.random_bool(0.1) || blocks > 900 {
                next += 1;
                (next, 2)
            } else {
                (conversation, blocks + 2)
            };
        }
        hits
    }

    /// A hot set among pairs, then conversations: the shadows should turn the frequent side
    /// to CLOCK for the first and back to recency for the second. Returns the hits of each
    /// phase and the order at the end of each.
    fn prompts_then_conversations(shadows: bool) -> ([u64; 2], [FrequentOrder; 2]) {
        let mut cache = Cache::new(CAPACITY);
        if !shadows {
            cache.policy().without_shadows();
        }
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let hot = hot_set_among_pairs(&mut cache, 20);
        let after_hot = cache.policy().frequent_order();
        let talk = conversations(&mut cache, &mut rng, 4_000);
        ([hot, talk], [after_hot, cache.policy().frequent_order()])
    }

    #[test]
    fn shadows_choose_the_frequent_order_the_workload_wants() {
        let (hits, orders) = prompts_then_conversations(true);
        let (fixed_hits, fixed_orders) = prompts_then_conversations(false);
        assert_eq!(orders, [FrequentOrder::Clock, FrequentOrder::Recency]);
        assert_eq!(fixed_orders, [FrequentOrder::Recency; 2]);
        // The hot set: kept by uses, lost by recency.
        assert!(
            hits[0] > 2 * fixed_hits[0],
            "hot set: {} with shadows, {} without",
            hits[0],
            fixed_hits[0]
        );
        // Conversations: back on recency, nothing lost against never having left it.
        assert!(
            hits[1] * 100 > fixed_hits[1] * 98,
            "conversations: {} with shadows, {} without",
            hits[1],
            fixed_hits[1]
        );
    }

    /// Uses of keys drawn with Zipf popularity (exponent 0.8 over 3,000 keys): a frequent
    /// side that holds the popular keys, behind a small recent side for the rest, keeps the
    /// most. Returns the hits over the last half of the uses and the target at the end.
    fn zipf_popular_keys(cache: &mut Cache) -> (u64, usize) {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11);
        let mut total = 0.0;
        let cumulative: Vec<f64> = (1..=3_000u32)
            .map(|rank| {
                total += f64::from(rank).powf(-0.8);
                total
            })
            .collect();
        let uses = 100_000;
        let mut hits = 0;
        for use_ in 0..uses {
            let drawn = rand::Rng::random_range(&mut rng, 0.0..total);
            let key = cumulative.partition_point(|&c| c < drawn) as u64;
            let hit = cache.touch(7_000_000 + key);
            if use_ >= uses / 2 {
                hits += u64::from(hit);
            }
        }
        (hits, cache.policy().target_recent())
    }

    /// A cache whose target only the split duel moves (`duel`), or nothing.
    fn split_by(duel: bool) -> Cache {
        let mut cache = Cache::new(CAPACITY);
        cache.policy().target_ignoring(true, !duel);
        cache
    }

    /// With ghost hits ignored, the split duel alone moves the target each way the workload
    /// wants: down on Zipf-popular keys, up where keys come back at 3/5 of the cache's size
    /// (from half the cache, the larger miniature's recent side, 7/10, catches them; the
    /// smaller's does not). Left alone, the target stays at half the cache and keeps less.
    #[test]
    fn the_split_duel_moves_the_target_where_a_miniature_keeps_more() {
        let (hits, target) = zipf_popular_keys(&mut split_by(true));
        let (fixed_hits, fixed_target) = zipf_popular_keys(&mut split_by(false));
        assert_eq!(fixed_target, CAPACITY / 2);
        assert!(target < CAPACITY / 10, "Zipf: target {target}");
        assert!(
            hits * 100 > fixed_hits * 105,
            "Zipf: {hits} hits with the duel, {fixed_hits} without"
        );

        let recency = |duel| {
            let mut cache = split_by(duel);
            let hits = used_twice(&mut cache, 0, 20 * CAPACITY as u64, 3 * CAPACITY as u64 / 5);
            (hits, cache.policy().target_recent())
        };
        let keys = 20 * CAPACITY as u64;
        let (hits, target) = recency(true);
        let (fixed_hits, fixed_target) = recency(false);
        assert_eq!(fixed_target, CAPACITY / 2);
        assert!(target > CAPACITY * 9 / 10, "recency: target {target}");
        assert!(hits * 10 > keys * 9, "recency, duel: {hits} of {keys}");
        assert!(
            fixed_hits * 10 < keys,
            "recency, fixed: {fixed_hits} of {keys}"
        );
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

    /// A block keyed by `fingerprint`, in no chain.
    fn hint(fingerprint: u32) -> EntryHint {
        EntryHint {
            key_hash: u64::from(fingerprint),
            ..EntryHint::default()
        }
    }

    /// A new block the sketch has seen before starts in `frequent` only if seen at least
    /// as often as the block `frequent` lets go next: a key seen a second time does not push
    /// out one used six times, a key seen six times does. Fails if any key seen twice is
    /// admitted (the rule before TinyLFU's comparison), or if the comparison is strict.
    #[test]
    fn a_key_seen_again_enters_frequent_only_if_seen_as_often_as_its_next_victim() {
        let mut policy = Adaptive::default();
        policy.without_shadows();
        for id in 0..10 {
            policy.insert(id, hint(id));
            for _ in 0..5 {
                policy.access(id);
            }
        }
        let segment = |policy: &Adaptive, id| usize::from(policy.lists.data(id).segment);
        assert!((0..10).all(|id| segment(&policy, id) == FREQUENT));
        let next = policy.lists.back(FREQUENT).expect("a frequent block");
        let victim_count = policy.sketch.estimate(policy.lists.data(next).fingerprint);
        assert_eq!(victim_count, 6);
        // Seen once before (not among the ghosts: never resident).
        policy.sketch.increment(100);
        policy.insert(10, hint(100));
        assert_eq!(segment(&policy, 10), RECENT);
        // Seen as often as the next victim, this use included.
        for _ in 0..victim_count - 1 {
            policy.sketch.increment(200);
        }
        policy.insert(11, hint(200));
        assert_eq!(segment(&policy, 11), FREQUENT);
    }

    /// A policy (no shadows) holding enough blocks, each keyed by its id, for a sketch of
    /// 2 MiB, and how many.
    fn large_sketch() -> (Adaptive, EntryId) {
        let mut policy = Adaptive::default();
        policy.without_shadows();
        let resident: EntryId = 40_000;
        for id in 0..resident {
            policy.insert(id, hint(id));
        }
        assert!(policy.batches());
        (policy, resident)
    }

    /// Where the sketch is larger than the caches, uses are counted and inserts' keys looked
    /// up among the ghosts in batches: a new block waits in `recent` until its batch, and
    /// then moves to `frequent` (its key seen before, or back from a ghost, which moves the
    /// target) only if it is still the block that was put. Fails if the batch's answers are
    /// dropped, or given to a newer block under a reused id.
    #[test]
    fn a_large_sketch_places_new_blocks_when_it_counts_their_batch() {
        let (mut policy, resident) = large_sketch();
        policy.access(0);
        policy.apply_pending();
        let frequent = policy.segment_lens[FREQUENT];
        // Two keys used before (their blocks gone long ago, no ghosts left of them), one never.
        let (seen, seen_too, unseen) = (7_000_000, 7_000_001, 7_000_002);
        policy.sketch.count(seen);
        policy.sketch.count(seen_too);
        policy.insert(resident, hint(seen));
        policy.insert(resident + 1, hint(seen_too));
        assert_eq!(
            policy.lists.list_of(resident),
            Some(RECENT),
            "not counted yet"
        );
        // The second block goes before its batch is counted, and its id is reused.
        policy.remove(resident + 1);
        policy.insert(resident + 1, hint(unseen));
        // A block evicted from `recent`, its key put again.
        let victim = policy.pop_victim(&mut |_| true).expect("a victim");
        let target = policy.target_recent();
        policy.insert(victim, hint(policy.lists.data(victim).fingerprint));
        assert_eq!(
            policy.lists.list_of(victim),
            Some(RECENT),
            "not counted yet"
        );
        while !policy.pending.is_empty() {
            policy.access(0);
        }
        assert_eq!(policy.lists.list_of(resident), Some(FREQUENT));
        assert_eq!(usize::from(policy.lists.data(resident).segment), FREQUENT);
        assert_eq!(policy.lists.list_of(resident + 1), Some(RECENT));
        assert_eq!(policy.lists.list_of(victim), Some(FREQUENT));
        assert!(
            policy.target_recent() > target,
            "a return from recent's ghost grows it"
        );
        assert_eq!(policy.segment_lens[FREQUENT], frequent + 2);
        assert_eq!(policy.len(), resident as usize + 2);
        // The uses were counted: entry 0's key was used at least 32 times.
        assert_eq!(policy.sketch.estimate(0), super::super::prefix::SKETCH_MAX);
    }

    /// Where the sketch is large, hits wait with their batch too, and are applied in order;
    /// but a block used while it waits is never taken as a victim, nor forgotten on the wrong
    /// side: evicting it, removing it or ending its chain applies the batch first. Fails if
    /// any of the three looks at the block before its hit is applied.
    #[test]
    fn a_large_sketch_applies_hits_with_their_batch_and_never_evicts_a_block_just_used() {
        let (mut policy, _) = large_sketch();
        policy.freeze();
        policy.apply_pending();
        assert_eq!(policy.lists.back(RECENT), Some(0));
        // The two oldest blocks are used: both wait, still last in `recent`.
        policy.access(0);
        policy.access(1);
        assert_eq!(policy.lists.list_of(0), Some(RECENT), "held for the batch");
        assert_eq!(policy.lists.back(RECENT), Some(0));
        // An eviction applies them: the oldest block not used goes.
        assert_eq!(policy.pop_victim(&mut |_| true), Some(2));
        assert!(policy.pending.is_empty());
        assert_eq!(policy.lists.list_of(0), Some(FREQUENT));
        assert_eq!(policy.lists.list_of(1), Some(FREQUENT));
        // In the order they came: 1 was used last.
        assert_eq!(policy.lists.iter_from_back(FREQUENT).last(), Some(1));
        // A block used, then removed: remembered as a frequent one.
        policy.access(3);
        let frequent_ghosts = policy.ghosts.lens[FREQUENT];
        policy.remove(3);
        assert_eq!(policy.ghosts.lens[FREQUENT], frequent_ghosts + 1);
        // A block used, then its chain ended: the end is the later word, it goes first.
        policy.access(4);
        policy.chain_ended(4);
        assert_eq!(policy.lists.back(FIRST_OUT), Some(4));
        assert_eq!(policy.pop_victim(&mut |_| true), Some(4));
    }
}
