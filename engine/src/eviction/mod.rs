//! The eviction seam: which resident block goes first when space is needed.
//!
//! A policy orders entries it is told about and hands back the coldest on request. It knows
//! nothing of bytes or pins: the engine tells it about every insert (with the block's key
//! hash and, for a block put as part of a prefix chain, its parent and depth), access and
//! removal, and asks for victims with a predicate that refuses pinned blocks. Policies are
//! single-threaded; the engine serialises calls.
//!
//! Entries are small integers ([`EntryId`]) chosen by the engine and reused after removal, so
//! a policy keeps its state in flat arrays: no allocation per access, no hashing per access
//! (the prefix-aware policy hashes into its frequency sketch, nothing else does).
//!
//! Four policies:
//! - [`Adaptive`] (the default): ARC's split between blocks seen once and blocks seen twice,
//!   its target moved by hits on the keys each side let go of, so it leans to recency or to
//!   frequency as the workload asks; with the leaf rule, partial blocks and ended chains of
//!   [`PrefixAware`].
//! - [`Lru`]: least recently used, the baseline;
//! - [`S3Fifo`]: S3-FIFO (Yang et al., SOSP 2023): new blocks wait in a small FIFO queue and
//!   only those used again there move to the main queue; a ghost queue of recently evicted
//!   key hashes sends a returning block straight to main. Scan resistant.
//! - [`PrefixAware`] (the default before [`Adaptive`]; its constants were fitted on one
//!   trace): never evicts a block while a resident child depends on it (a prefix
//!   is only useful from its head, so a cached tail whose head is gone is dead weight), and
//!   among leaves weighs recency, frequency (a count-min sketch of key hashes that outlives
//!   residency) and depth in the chain (deeper blocks go first). A chain's partial last
//!   block goes before all of them, unless it has been used since it was put, and a chain its
//!   caller said is over goes before that.

use std::fmt;
use std::str::FromStr;

mod adaptive;
mod chain;
mod ghosts;
mod lists;
mod lru;
mod prefix;
mod s3fifo;

/// Asks the CPU to start loading the cache line at `at` (a hint: nothing on targets without
/// one). A policy's updates land on random lines of tables far larger than the caches; one
/// asked for before the work that needs it overlaps its miss with the others.
#[inline]
#[cfg_attr(
    target_arch = "x86_64",
    expect(unsafe_code, reason = "the prefetch intrinsic takes a raw pointer")
)]
fn prefetch<T>(at: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: `at` is a reference, so the address is valid; a prefetch only reads into
        // the cache, never faults, and changes nothing a program can observe.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(at).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

pub use adaptive::{Adaptive, FrequentOrder};
pub use lru::Lru;
pub use prefix::PrefixAware;
pub use s3fifo::S3Fifo;

/// Which policy to run. Chosen in [`EngineConfig`](crate::EngineConfig); parsed from
/// `adaptive`, `lru`, `s3-fifo` and `prefix-aware`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EvictionPolicyKind {
    /// Least recently used.
    Lru,
    /// S3-FIFO: a small probationary FIFO, a main FIFO with reinsertion, a ghost queue.
    S3Fifo,
    /// Chain aware: leaves first, by recency, frequency and depth, with constants fitted on
    /// the production trace (the default before [`EvictionPolicyKind::Adaptive`]).
    PrefixAware,
    /// ARC's recency/frequency balance learnt online, with the chain rules of prefix-aware.
    /// The default: see the README's eviction section for why.
    #[default]
    Adaptive,
}

impl EvictionPolicyKind {
    /// Every policy, in the order of their names in [`EvictionPolicyKind::NAMES`].
    pub const ALL: [Self; 4] = [Self::Lru, Self::S3Fifo, Self::PrefixAware, Self::Adaptive];
    /// The names [`FromStr`] accepts.
    pub const NAMES: [&'static str; 4] = ["lru", "s3-fifo", "prefix-aware", "adaptive"];

    /// The policy's name, as parsed.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => Self::NAMES[0],
            Self::S3Fifo => Self::NAMES[1],
            Self::PrefixAware => Self::NAMES[2],
            Self::Adaptive => Self::NAMES[3],
        }
    }
}

impl fmt::Display for EvictionPolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An eviction policy name that is not one of [`EvictionPolicyKind::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {0:?}: expected one of adaptive, lru, s3-fifo, prefix-aware")]
pub struct UnknownPolicy(pub String);

impl FromStr for EvictionPolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// Dense identifier of a resident entry, assigned by the engine.
pub type EntryId = u32;

/// What the engine knows about an entry when it becomes resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryHint {
    /// A stable 64-bit hash of the block's key: the same key gives the same hash across
    /// evictions, so a policy can remember keys it let go of.
    pub key_hash: u64,
    /// The entry of the block's parent (the previous block of its prefix chain) when the
    /// parent is resident in the same tier. The parent was inserted before the child.
    pub parent: Option<EntryId>,
    /// Blocks before this one in its chain, as far as the engine knows (0: a chain's head or
    /// an unlinked block).
    pub depth: u32,
    /// The block ends its chain with fewer tokens than a full block
    /// ([`ChainEnd::Partial`](crate::ChainEnd::Partial)): only the same prompt again can use
    /// it. Only [`PrefixAware`] and [`Adaptive`] act on it; LRU stays plain LRU.
    pub partial: bool,
}

/// Orders resident entries for eviction.
pub trait EvictionPolicy: Send + fmt::Debug {
    /// A new entry became resident. `id` is not currently tracked.
    fn insert(&mut self, id: EntryId, hint: EntryHint);
    /// A tracked entry was used.
    fn access(&mut self, id: EntryId);
    /// A tracked entry left for a reason of its own (removed, overwritten).
    fn remove(&mut self, id: EntryId);
    /// The caller will neither extend nor read again the chain that ends at `id` (its
    /// conversation or task is over): a hint that the chain's blocks may go before others.
    /// The default ignores it; [`PrefixAware`] and [`Adaptive`] act on it. An entry used afterwards is
    /// treated as any other.
    fn chain_ended(&mut self, id: EntryId) {
        let _ = id;
    }
    /// Removes and returns the entry to evict first among those `evictable` accepts, or
    /// `None` when no tracked entry is accepted. An entry `evictable` refuses stays tracked,
    /// treated as just used; each call looks at every tracked entry a bounded number of times.
    fn pop_victim(&mut self, evictable: &mut dyn FnMut(EntryId) -> bool) -> Option<EntryId>;
    /// Whether the entry the last [`pop_victim`](Self::pop_victim) returned is one this policy
    /// expects no further use of (a chain its caller ended, a partial block never used again),
    /// so a tier below need not keep it. The default: always `false`.
    fn victim_has_no_future(&self) -> bool {
        false
    }
    /// Number of tracked entries.
    fn len(&self) -> usize;
    /// Whether nothing is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of bookkeeping the policy holds now (per-entry arrays, queues, sketches).
    fn memory_bytes(&self) -> usize;
}

/// Builds the policy a config names.
pub fn new_policy(kind: EvictionPolicyKind) -> Box<dyn EvictionPolicy> {
    new_policy_holding(kind, true)
}

/// [`new_policy`], with the rule of prefix-aware and adaptive of holding a block while a later
/// block of its chain is resident on or off (`EngineConfig::hold_chain_parents`; LRU and
/// S3-FIFO have no such rule).
pub fn new_policy_holding(
    kind: EvictionPolicyKind,
    hold_chain_parents: bool,
) -> Box<dyn EvictionPolicy> {
    match kind {
        EvictionPolicyKind::Lru => Box::new(Lru::default()),
        EvictionPolicyKind::S3Fifo => Box::new(S3Fifo::default()),
        EvictionPolicyKind::PrefixAware if hold_chain_parents => Box::new(PrefixAware::default()),
        EvictionPolicyKind::PrefixAware => Box::new(PrefixAware::letting_parents_go()),
        EvictionPolicyKind::Adaptive if hold_chain_parents => Box::new(Adaptive::default()),
        EvictionPolicyKind::Adaptive => Box::new(Adaptive::letting_parents_go()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// What a test knows about a tracked entry.
    #[derive(Debug, Clone, Copy)]
    struct Tracked {
        incarnation: u64,
        parent: Option<(EntryId, u64)>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert `id` (if not tracked) as a child of a tracked entry picked by the second
        /// number, or as a head; partial or not.
        Insert(EntryId, Option<u8>, bool),
        Access(EntryId),
        Remove(EntryId),
        /// The chain ending at `id` is over.
        Ended(EntryId),
        /// Ask for a victim; entries whose id is a multiple of the number are pinned.
        Pop(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..48, proptest::option::of(any::<u8>()), proptest::bool::weighted(0.2))
                .prop_map(|(id, p, partial)| Op::Insert(id, p, partial)),
            2 => (0u32..48).prop_map(Op::Access),
            1 => (0u32..48).prop_map(Op::Remove),
            1 => (0u32..48).prop_map(Op::Ended),
            3 => (2u8..8).prop_map(Op::Pop),
        ]
    }

    /// Runs `ops` against `kind` and a model, checking what every policy promises: the
    /// count, that a victim is tracked and accepted, that `None` means nothing could go, and
    /// for the prefix-aware policy that no victim has a resident child.
    fn check(kind: EvictionPolicyKind, ops: Vec<Op>) -> Result<(), TestCaseError> {
        check_holding(kind, true, ops)
    }

    /// [`check`], with prefix-aware holding parents or not: the leaf rule is checked only
    /// when it holds them.
    fn check_holding(
        kind: EvictionPolicyKind,
        hold_chain_parents: bool,
        ops: Vec<Op>,
    ) -> Result<(), TestCaseError> {
        let mut policy = new_policy_holding(kind, hold_chain_parents);
        let mut model: HashMap<EntryId, Tracked> = HashMap::new();
        let mut incarnations = 0u64;
        let has_resident_child = |model: &HashMap<EntryId, Tracked>, id: EntryId| {
            let me = model[&id].incarnation;
            model.values().any(|t| t.parent == Some((id, me)))
        };
        for op in ops {
            match op {
                Op::Insert(id, parent, partial) => {
                    if model.contains_key(&id) {
                        continue;
                    }
                    let mut tracked: Vec<EntryId> = model.keys().copied().collect();
                    tracked.sort_unstable();
                    let parent = parent
                        .filter(|_| !tracked.is_empty())
                        .map(|p| tracked[usize::from(p) % tracked.len()]);
                    incarnations += 1;
                    let depth = parent.map_or(0, |_| 1);
                    policy.insert(
                        id,
                        EntryHint {
                            key_hash: u64::from(id) * 7919,
                            parent,
                            depth,
                            partial,
                        },
                    );
                    model.insert(
                        id,
                        Tracked {
                            incarnation: incarnations,
                            parent: parent.map(|p| (p, model[&p].incarnation)),
                        },
                    );
                }
                Op::Access(id) if model.contains_key(&id) => policy.access(id),
                Op::Ended(id) if model.contains_key(&id) => policy.chain_ended(id),
                Op::Remove(id) if model.contains_key(&id) => {
                    policy.remove(id);
                    model.remove(&id);
                }
                Op::Pop(pin_every) => {
                    let pinned = |id: EntryId| id % u32::from(pin_every) == 0;
                    let mut asked = Vec::new();
                    let victim = policy.pop_victim(&mut |id| {
                        asked.push(id);
                        !pinned(id)
                    });
                    for id in &asked {
                        prop_assert!(model.contains_key(id), "{kind}: asked about untracked {id}");
                    }
                    let leaf_rule = matches!(
                        kind,
                        EvictionPolicyKind::PrefixAware | EvictionPolicyKind::Adaptive
                    ) && hold_chain_parents;
                    match victim {
                        Some(id) => {
                            prop_assert!(
                                model.contains_key(&id),
                                "{kind}: victim {id} not tracked"
                            );
                            prop_assert!(!pinned(id), "{kind}: pinned {id} chosen");
                            if leaf_rule {
                                prop_assert!(
                                    !has_resident_child(&model, id),
                                    "{kind}: {id} evicted before its child"
                                );
                            }
                            model.remove(&id);
                        }
                        None => {
                            let could_go = model.keys().any(|&id| {
                                !(pinned(id) || leaf_rule && has_resident_child(&model, id))
                            });
                            prop_assert!(
                                !could_go,
                                "{kind}: nothing chosen though something could go"
                            );
                        }
                    }
                }
                _ => {}
            }
            prop_assert_eq!(policy.len(), model.len());
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn lru_keeps_its_promises(ops in proptest::collection::vec(op(), 0..300)) {
            check(EvictionPolicyKind::Lru, ops)?;
        }

        #[test]
        fn s3_fifo_keeps_its_promises(ops in proptest::collection::vec(op(), 0..300)) {
            check(EvictionPolicyKind::S3Fifo, ops)?;
        }

        /// Random chains, some of them ended: a parent is never evicted while a child of it
        /// is resident, pinned entries are never chosen, and something is chosen whenever
        /// something may go.
        #[test]
        fn prefix_aware_evicts_leaves_only(ops in proptest::collection::vec(op(), 0..300)) {
            check(EvictionPolicyKind::PrefixAware, ops)?;
        }

        /// The same without the leaf rule (a cluster member's setting): pins are respected,
        /// something is chosen whenever anything unpinned is tracked, and ended chains (which
        /// walk the links) keep the bookkeeping consistent.
        #[test]
        fn prefix_aware_letting_parents_go_keeps_its_promises(
            ops in proptest::collection::vec(op(), 0..300)
        ) {
            check_holding(EvictionPolicyKind::PrefixAware, false, ops)?;
        }
    }

    proptest! {
        /// The leaf rule, pins and the count, with ghosts coming back and the target moving.
        #[test]
        fn adaptive_evicts_leaves_only(ops in proptest::collection::vec(op(), 0..300)) {
            check(EvictionPolicyKind::Adaptive, ops)?;
        }

        #[test]
        fn adaptive_letting_parents_go_keeps_its_promises(
            ops in proptest::collection::vec(op(), 0..300)
        ) {
            check_holding(EvictionPolicyKind::Adaptive, false, ops)?;
        }
    }

    #[test]
    fn names_round_trip() {
        for kind in EvictionPolicyKind::ALL {
            assert_eq!(kind.name().parse::<EvictionPolicyKind>(), Ok(kind));
        }
        assert_eq!(
            "S3-FIFO".parse::<EvictionPolicyKind>(),
            Ok(EvictionPolicyKind::S3Fifo)
        );
        let err = "lfu".parse::<EvictionPolicyKind>().unwrap_err();
        assert!(
            err.to_string()
                .contains("adaptive, lru, s3-fifo, prefix-aware"),
            "{err}"
        );
    }
}
