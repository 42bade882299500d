//! The simulated caches: the eviction policies alone on block ids, on one cache or a
//! cluster of them, and the offline references (Belady's MIN, LRU with a reuse oracle, the
//! most used blocks).

use std::collections::{BinaryHeap, HashMap, HashSet};

use mooncake_kv_engine::eviction::{
    EntryHint, EntryId, EvictionPolicy, EvictionPolicyKind, new_policy_holding,
};
use mooncake_kv_engine::seeded_key_hash;
use mooncake_kv_replication::placement::{self, Member};
use serde::Serialize;

use super::real::{REPLAY_HASH_SEED, block_key};
use super::*;

/// Runs `kind`'s policy alone over `trace` with room for `capacity` blocks: block ids stand
/// for blocks, a request's blocks are linked to the block before them, the matched prefix is
/// used (head first, as `Engine::prefix_match` does), and blocks from the first miss on are
/// inserted, evicting as each one arrives.
pub fn simulate(trace: &Trace, kind: EvictionPolicyKind, capacity: usize) -> Hits {
    simulate_with_hints(trace, kind, capacity, &[])
}

/// [`simulate`], telling the policy after request `i` that its chain ended when `ended[i]` is
/// set (see [`Trace::ended_chains`]); requests past `ended`'s end get no hint.
pub fn simulate_with_hints(
    trace: &Trace,
    kind: EvictionPolicyKind,
    capacity: usize,
    ended: &[bool],
) -> Hits {
    simulate_cluster(trace, kind, capacity, ClusterShape::SINGLE, ended)
}

/// A simulated cluster: `nodes` caches, each block on `replicas` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClusterShape {
    /// Members.
    pub nodes: usize,
    /// Copies of each block (R).
    pub replicas: usize,
}

impl ClusterShape {
    /// One cache holding every block once: the plain simulation.
    pub const SINGLE: Self = Self {
        nodes: 1,
        replicas: 1,
    };

    /// Whether its members' prefix-aware eviction holds a block while a later block of its
    /// chain is resident: on one cache only, as `mooncake-kvd` does (see
    /// `EngineConfig::hold_chain_parents`).
    pub fn holds_chain_parents(self) -> bool {
        self.nodes == 1
    }

    /// Blocks each member holds when the cluster holds `capacity` distinct blocks R times.
    pub fn per_node(self, capacity: usize) -> usize {
        (capacity * self.replicas).div_ceil(self.nodes).max(1)
    }
}

impl std::fmt::Display for ClusterShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.nodes, self.replicas)
    }
}

impl std::str::FromStr for ClusterShape {
    type Err = String;

    /// `NODESxREPLICAS`, e.g. `3x2`: 1 to 256 nodes, 1 to `nodes` replicas.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not NODESxREPLICAS (e.g. 3x2)");
        let (nodes, replicas) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let nodes: usize = nodes.trim().parse().map_err(|_| bad())?;
        let replicas: usize = replicas.trim().parse().map_err(|_| bad())?;
        if !(1..=256).contains(&nodes) || !(1..=nodes).contains(&replicas) {
            return Err(format!(
                "{s:?}: need 1 to 256 nodes and 1 to that many replicas"
            ));
        }
        Ok(Self { nodes, replicas })
    }
}

/// One simulated cache: a policy over block ids, with room for `capacity` blocks.
struct SimCache {
    policy: Box<dyn EvictionPolicy>,
    resident: HashMap<u64, EntryId>,
    /// Each entry's block id and depth.
    ids_of: Vec<(u64, u32)>,
    free: Vec<EntryId>,
    capacity: usize,
}

impl SimCache {
    fn new(kind: EvictionPolicyKind, capacity: usize, hold_chain_parents: bool) -> Self {
        Self {
            policy: new_policy_holding(kind, hold_chain_parents),
            resident: HashMap::new(),
            ids_of: Vec::new(),
            free: Vec::new(),
            capacity,
        }
    }

    fn access(&mut self, block: u64) -> bool {
        let Some(&entry) = self.resident.get(&block) else {
            return false;
        };
        self.policy.access(entry);
        true
    }

    /// Puts `block` under `parent`, evicting as needed. As in the engine, room is made before
    /// the block goes in, and not by evicting its parent: the engine's chain put pins the
    /// block before the one it puts (`Engine::chain`), so a policy never sees a block of a
    /// chain being put as a victim before the next is in. As in the engine too, it is linked
    /// to the parent and one deeper if the parent is here; a named parent that is not makes
    /// it an orphan of depth 1; no parent, a head of depth 0.
    fn insert(&mut self, block: u64, parent: Option<u64>, partial: bool) {
        if let Some(entry) = self.resident.remove(&block) {
            // Put again, as the engine's replay does: a new block under the same key.
            self.policy.remove(entry);
            self.free.push(entry);
        }
        let held = parent.and_then(|p| self.resident.get(&p).copied());
        while self.resident.len() >= self.capacity {
            let Some(victim) = self.policy.pop_victim(&mut |entry| Some(entry) != held) else {
                break;
            };
            self.resident.remove(&self.ids_of[victim as usize].0);
            self.free.push(victim);
        }
        let depth = match (parent, held) {
            (_, Some(p)) => self.ids_of[p as usize].1.saturating_add(1),
            (Some(_), None) => 1,
            (None, None) => 0,
        };
        let entry = self.free.pop().unwrap_or_else(|| {
            self.ids_of.push((0, 0));
            (self.ids_of.len() - 1) as EntryId
        });
        self.ids_of[entry as usize] = (block, depth);
        self.policy.insert(
            entry,
            EntryHint {
                // The hash the replayed engine gives the block's key, so both feed the policy
                // the same collisions (and the adaptive policy's sample the same keys).
                key_hash: seeded_key_hash(REPLAY_HASH_SEED, &block_key(block)),
                parent: held,
                depth,
                partial,
            },
        );
        self.resident.insert(block, entry);
    }

    /// Tells the policy that `chain` ended, from its deepest block held here.
    fn end(&mut self, chain: &[u64]) {
        if let Some(&tail) = chain.iter().rev().find_map(|id| self.resident.get(id)) {
            self.policy.chain_ended(tail);
        }
    }
}

/// [`simulate_with_hints`] over a cluster of `shape.nodes` caches holding `capacity` distinct
/// blocks `shape.replicas` times between them, used the way `ClusterClient` uses its members:
/// each block placed by weighted rendezvous hashing of its id (all members at full weight); a
/// block is a hit if any of its replicas holds it, and is read from the first of them in
/// placement order (a lone client's `get`, which only that replica's policy sees); each
/// member receives its share of a request's missing blocks, linked in chain order under the
/// matched prefix's last block (`ClusterClient::put_chain`); an ended chain is told to every
/// member; a member holds no block for the sake of a later one (what `mooncake-kvd` does
/// with peers). `ClusterShape::SINGLE` is the plain simulation.
pub fn simulate_cluster(
    trace: &Trace,
    kind: EvictionPolicyKind,
    capacity: usize,
    shape: ClusterShape,
    ended: &[bool],
) -> Hits {
    let per_node = shape.per_node(capacity);
    let mut caches: Vec<SimCache> = (0..shape.nodes)
        .map(|_| SimCache::new(kind, per_node, shape.holds_chain_parents()))
        .collect();
    let members: Vec<Member> = (0..shape.nodes as u64).map(Member::full).collect();
    let place = |block: u64| -> Vec<usize> {
        if shape.nodes == 1 {
            return vec![0];
        }
        placement::replicas(&block.to_le_bytes(), &members, shape.replicas)
            .into_iter()
            .map(|id| id as usize)
            .collect()
    };
    let mut hits = Hits::default();
    let mut last_on: Vec<Option<u64>> = vec![None; shape.nodes];
    for (number, request) in trace.requests.iter().enumerate() {
        let chain = &request.hash_ids;
        let places: Vec<Vec<usize>> = chain.iter().map(|&block| place(block)).collect();
        let matched = chain
            .iter()
            .zip(&places)
            .take_while(|&(block, replicas)| {
                replicas
                    .iter()
                    .any(|&n| caches[n].resident.contains_key(block))
            })
            .count();
        hits.count(trace, request, matched);
        for (&block, replicas) in chain[..matched].iter().zip(&places) {
            for &n in replicas {
                if caches[n].access(block) {
                    break;
                }
            }
        }
        last_on.fill(matched.checked_sub(1).map(|i| chain[i]));
        let ends_partial = trace.ends_partial(request);
        for (at, (&block, replicas)) in chain.iter().zip(&places).enumerate().skip(matched) {
            let partial = ends_partial && at + 1 == chain.len();
            for &n in replicas {
                caches[n].insert(block, last_on[n], partial);
                last_on[n] = Some(block);
            }
        }
        if ended.get(number).copied().unwrap_or(false) {
            for cache in &mut caches {
                cache.end(chain);
            }
        }
    }
    hits
}

/// Belady's MIN with room for `capacity` blocks: on every reference, the block is cached,
/// and while over capacity the cached block whose next use is farthest away goes. Optimal
/// for plain hits; the reference figure for prefix hits.
pub fn belady(trace: &Trace, capacity: usize) -> Hits {
    // The heap holds (next use, block), oldest pairs skipped: a block's value in `cached` is
    // its next use.
    let mut heap: BinaryHeap<(u64, u64)> = BinaryHeap::new();
    replay_offline(trace, |cached, block, _, next| {
        cached.insert(block, next);
        heap.push((next, block));
        while cached.len() > capacity {
            let Some((next, victim)) = heap.pop() else {
                break;
            };
            if cached.get(&victim) == Some(&next) {
                cached.remove(&victim);
            }
        }
    })
}

/// LRU with room for `capacity` blocks that caches a referenced block only if the trace uses
/// it again later (and drops it at its last use): an offline reference that separates what
/// an online policy must guess, which blocks have a future, from the order LRU keeps them in.
pub fn lru_with_reuse_oracle(trace: &Trace, capacity: usize) -> Hits {
    use std::collections::BTreeSet;
    // `order` holds (last use, block), oldest first: a block's value in `cached` is its last
    // use.
    let mut order: BTreeSet<(u64, u64)> = BTreeSet::new();
    replay_offline(trace, |cached, block, position, next| {
        if let Some(last) = cached.remove(&block) {
            order.remove(&(last, block));
        }
        if next != u64::MAX {
            cached.insert(block, position);
            order.insert((position, block));
        }
        while cached.len() > capacity {
            let Some((_, victim)) = order.pop_first() else {
                break;
            };
            cached.remove(&victim);
        }
    })
}

/// The `capacity` blocks `trace` references most, each cached from its first reference on
/// and never let go (of blocks referenced equally often, those referenced first): an offline
/// reference that knows each block's popularity and nothing of when it is used. Where
/// requests are independent draws from a fixed popularity (the system prompts regime of
/// [`generate`](super::generate)), no online policy does better (Aho, Denning and Ullman's
/// A0); where popularity moves (conversations), LRU can.
pub fn most_used(trace: &Trace, capacity: usize) -> Hits {
    // Per block, its references and the position of its first.
    let mut uses: HashMap<u64, (u64, u64)> = HashMap::new();
    for (position, block) in references(trace).enumerate() {
        uses.entry(block).or_insert((0, position as u64)).0 += 1;
    }
    let mut ranked: Vec<(u64, (u64, u64))> = uses.into_iter().collect();
    ranked.sort_unstable_by_key(|&(_, (count, first))| (std::cmp::Reverse(count), first));
    let kept: HashSet<u64> = ranked
        .into_iter()
        .take(capacity)
        .map(|(block, _)| block)
        .collect();
    replay_offline(trace, |cached, block, _, _| {
        if kept.contains(&block) {
            cached.insert(block, 0);
        }
    })
}

/// Replays `trace` against an offline cache, `cached` (block -> a value of the reference's
/// choosing): for each request, counts the prefix of its blocks in `cached`, then hands
/// `reference` each of its blocks in turn, with its position among all block references and
/// the position of its next use (`u64::MAX`: none), to update `cached`.
fn replay_offline(
    trace: &Trace,
    mut reference: impl FnMut(&mut HashMap<u64, u64>, u64, u64, u64),
) -> Hits {
    let next_use = next_uses(trace);
    let mut cached = HashMap::new();
    let mut hits = Hits::default();
    let mut position = 0;
    for request in &trace.requests {
        let matched = cached_prefix(&request.hash_ids, |id| cached.contains_key(id));
        hits.count(trace, request, matched);
        for &block in &request.hash_ids {
            reference(&mut cached, block, position as u64, next_use[position]);
            position += 1;
        }
    }
    hits
}

/// For every block reference of `trace`, in order, the position of the next reference to the
/// same block (`u64::MAX`: none).
fn next_uses(trace: &Trace) -> Vec<u64> {
    let flat: Vec<u64> = references(trace).collect();
    let mut next_use = vec![u64::MAX; flat.len()];
    let mut last: HashMap<u64, u64> = HashMap::new();
    for (position, block) in flat.iter().enumerate().rev() {
        if let Some(&later) = last.get(block) {
            next_use[position] = later;
        }
        last.insert(*block, position as u64);
    }
    next_use
}

/// Every block reference of `trace`, in order.
fn references(trace: &Trace) -> impl Iterator<Item = u64> + '_ {
    trace
        .requests
        .iter()
        .flat_map(|r| r.hash_ids.iter().copied())
}
