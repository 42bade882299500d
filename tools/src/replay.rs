//! Replays a prefix-reuse trace against a cache and counts prefix hits.
//!
//! A trace is JSON lines, one request each, in arrival order (the format of the Mooncake
//! FAST'25 trace release): `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [block ids of the prompt's prefix chain, one per block of tokens]}`. Only
//! `input_length` and `hash_ids` are needed; other fields are ignored.
//!
//! For each request, in order: ask how many leading blocks of its chain are cached (the
//! prefix hit: a block after the first missing one is of no use), then store the blocks from
//! the first missing one on, linked as a chain whose end is marked partial when the prompt's
//! last block holds fewer tokens than a full block. The hit ratio in blocks is hit blocks over
//! block references; in tokens, the same weighted by each block's tokens (the last block of
//! a request is usually partial).
//!
//! Four ways to count, side by side:
//! - [`replay_engine`]: a real [`Engine`] holding `capacity` blocks (payloads scaled down),
//!   optionally with an NVMe tier below DRAM; hits are read back and checked byte for byte;
//! - [`simulate`]: the engine's eviction policy alone, on block ids, with the same links;
//! - [`belady`]: Belady's MIN, offline (evict the block used farthest in the future), the
//!   reference an online policy is measured against;
//! - [`lru_with_reuse_oracle`]: LRU that, offline, caches only blocks that will be used again:
//!   what knowing which blocks have a future (and nothing about when) is worth.

use std::collections::{BinaryHeap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use mooncake_kv_engine::eviction::{
    EntryHint, EntryId, EvictionPolicy, EvictionPolicyKind, new_policy_holding,
};
use mooncake_kv_engine::{ChainEnd, Engine, EngineConfig, TierKind};
use mooncake_kv_replication::placement::{self, Member};
use serde::{Deserialize, Serialize};

/// The longest line a trace may have, and the most blocks one request may name.
const MAX_LINE_BYTES: usize = 64 << 20;
const MAX_BLOCKS_PER_REQUEST: usize = 1 << 20;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Prompt tokens.
    pub input_length: u64,
    /// The prompt's prefix chain, one id per block.
    pub hash_ids: Vec<u64>,
}

/// A whole trace, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The requests.
    pub requests: Vec<Request>,
    /// Tokens per full block (the trace's block size; 512 for the Mooncake traces).
    pub tokens_per_block: u64,
}

#[derive(Deserialize)]
struct RawRequest {
    input_length: u64,
    hash_ids: Vec<u64>,
}

impl Trace {
    /// Reads a JSON-lines trace. Blank lines are skipped.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a line (named by number) is not a request: bad JSON, a
    /// missing field, an over-long line or chain.
    pub fn load(path: &Path, tokens_per_block: u64) -> anyhow::Result<Self> {
        ensure!(tokens_per_block > 0, "tokens per block must be positive");
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open trace {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut requests = Vec::new();
        let mut line = String::new();
        for number in 1.. {
            line.clear();
            let read = Read::take(&mut reader, MAX_LINE_BYTES as u64 + 1)
                .read_line(&mut line)
                .with_context(|| format!("{}:{number}: cannot read", path.display()))?;
            if read == 0 {
                break;
            }
            ensure!(
                line.len() <= MAX_LINE_BYTES,
                "{}:{number}: line longer than {MAX_LINE_BYTES} bytes",
                path.display()
            );
            if line.trim().is_empty() {
                continue;
            }
            let raw: RawRequest = serde_json::from_str(&line)
                .with_context(|| format!("{}:{number}: not a trace request", path.display()))?;
            ensure!(
                raw.hash_ids.len() <= MAX_BLOCKS_PER_REQUEST,
                "{}:{number}: {} blocks in one request (at most {MAX_BLOCKS_PER_REQUEST})",
                path.display(),
                raw.hash_ids.len()
            );
            requests.push(Request {
                input_length: raw.input_length,
                hash_ids: raw.hash_ids,
            });
        }
        if requests.is_empty() {
            bail!("{}: no requests", path.display());
        }
        Ok(Self {
            requests,
            tokens_per_block,
        })
    }

    /// For each request, whether a caller that knows when a conversation is over would say
    /// that its chain ended there: no later request uses any of its blocks after the first
    /// (the first, a system prompt in the Mooncake traces, is shared between conversations).
    /// Only `fraction` of such requests (chosen by a hash of their position) are marked: what
    /// a caller that knows about that share of the conversations it ends would tell.
    pub fn ended_chains(&self, fraction: f64) -> Vec<bool> {
        let mut used_later: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut ended = vec![false; self.requests.len()];
        for (number, request) in self.requests.iter().enumerate().rev() {
            let tail = request.hash_ids.get(1..).unwrap_or_default();
            let draw = (mix(number as u64) >> 11) as f64 / (1u64 << 53) as f64;
            let chosen = draw < fraction;
            ended[number] =
                chosen && !tail.is_empty() && !tail.iter().any(|id| used_later.contains(id));
            used_later.extend(request.hash_ids.iter().copied());
        }
        ended
    }

    /// Block references in all requests.
    pub fn block_refs(&self) -> u64 {
        self.requests.iter().map(|r| r.hash_ids.len() as u64).sum()
    }

    /// Distinct block ids.
    pub fn unique_blocks(&self) -> usize {
        let mut ids: Vec<u64> = self
            .requests
            .iter()
            .flat_map(|r| r.hash_ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Tokens in block `index` of `request`: full blocks, and what is left of the input in
    /// the last one (a full block when the lengths disagree).
    fn tokens(&self, request: &Request, index: usize) -> u64 {
        let full = self.tokens_per_block;
        let before = full.saturating_mul(index as u64);
        match request.input_length.checked_sub(before) {
            Some(left) if left > 0 && index + 1 == request.hash_ids.len() => left.min(full),
            _ => full,
        }
    }

    /// Whether `request`'s last block holds fewer tokens than a full block: what a replay
    /// tells the engine with [`ChainEnd::Partial`].
    fn ends_partial(&self, request: &Request) -> bool {
        request
            .hash_ids
            .len()
            .checked_sub(1)
            .is_some_and(|last| self.tokens(request, last) < self.tokens_per_block)
    }

    /// The share of block references that repeat an earlier one: what an unbounded cache hits.
    pub fn ceiling(&self) -> Hits {
        let mut seen = std::collections::HashSet::new();
        let mut hits = Hits::default();
        for request in &self.requests {
            let matched = cached_prefix(&request.hash_ids, |id| seen.contains(id));
            hits.count(self, request, matched);
            seen.extend(request.hash_ids.iter().copied());
        }
        hits
    }
}

/// Prefix hits counted over a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Hits {
    /// Block references.
    pub blocks: u64,
    /// Of those, in a cached prefix.
    pub hit_blocks: u64,
    /// Tokens in all block references.
    pub tokens: u64,
    /// Of those, in a cached prefix.
    pub hit_tokens: u64,
}

impl Hits {
    fn count(&mut self, trace: &Trace, request: &Request, matched: usize) {
        for index in 0..request.hash_ids.len() {
            let tokens = trace.tokens(request, index);
            self.blocks += 1;
            self.tokens += tokens;
            if index < matched {
                self.hit_blocks += 1;
                self.hit_tokens += tokens;
            }
        }
    }

    /// Hit blocks over block references.
    pub fn block_ratio(&self) -> f64 {
        ratio(self.hit_blocks, self.blocks)
    }

    /// Hit tokens over tokens.
    pub fn token_ratio(&self) -> f64 {
        ratio(self.hit_tokens, self.tokens)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

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

    /// Puts `block` under `parent`, evicting as needed. As in the engine, it is linked to the
    /// parent and one deeper if the parent is here; a named parent that is not makes it an
    /// orphan of depth 1; no parent, a head of depth 0.
    fn insert(&mut self, block: u64, parent: Option<u64>, partial: bool) {
        if let Some(entry) = self.resident.remove(&block) {
            // Put again, as the engine's replay does: a new block under the same key.
            self.policy.remove(entry);
            self.free.push(entry);
        }
        let held = parent.and_then(|p| self.resident.get(&p).copied());
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
                key_hash: mix(block),
                parent: held,
                depth,
                partial,
            },
        );
        self.resident.insert(block, entry);
        while self.resident.len() > self.capacity {
            let Some(victim) = self.policy.pop_victim(&mut |_| true) else {
                break;
            };
            self.resident.remove(&self.ids_of[victim as usize].0);
            self.free.push(victim);
        }
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
    let flat: Vec<u64> = trace
        .requests
        .iter()
        .flat_map(|r| r.hash_ids.iter().copied())
        .collect();
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

/// How many leading blocks of `chain` are cached: a prefix hit stops at the first miss.
fn cached_prefix(chain: &[u64], is_cached: impl Fn(&u64) -> bool) -> usize {
    chain.iter().take_while(|id| is_cached(id)).count()
}

/// A block id's key hash for a policy (the engine hashes real keys).
fn mix(id: u64) -> u64 {
    let mut x = id ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How [`replay_engine`] sets up its engine.
#[derive(Debug, Clone)]
pub struct EngineReplay {
    /// The engine's eviction policy (for both tiers).
    pub policy: EvictionPolicyKind,
    /// Blocks DRAM holds.
    pub dram_blocks: usize,
    /// Payload bytes per block.
    pub block_bytes: usize,
    /// An NVMe tier below DRAM holding this many more blocks, in a fresh data directory
    /// under this path; `None`: DRAM only.
    pub nvme: Option<(std::path::PathBuf, usize)>,
    /// After request `i`, call `Engine::end_chain` with its chain when `ended[i]` is set
    /// ([`Trace::ended_chains`]); empty: never.
    pub ended: Vec<bool>,
}

/// What [`replay_engine`] measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EngineHits {
    /// Prefix hits, all tiers.
    pub hits: Hits,
    /// Hit blocks read from DRAM.
    pub dram_hit_blocks: u64,
    /// Hit blocks read from NVMe.
    pub nvme_hit_blocks: u64,
    /// Hit blocks whose bytes were not the ones put (must be 0).
    pub wrong_blocks: u64,
    /// Blocks evicted from DRAM (demoted, with NVMe).
    pub dram_evictions: u64,
    /// Wall time of the replay.
    pub seconds: f64,
}

/// An engine whose DRAM holds exactly `blocks` blocks of `block_bytes` under `policy`, and
/// evicts only when a put finds it full, exactly as much as the put needs.
fn dram_config(
    policy: EvictionPolicyKind,
    blocks: usize,
    block_bytes: usize,
) -> anyhow::Result<EngineConfig> {
    let block_len = mooncake_kv_engine::format::encoded_len(8, block_bytes, 64);
    // The DRAM tier allocates in 512-byte units; every block takes the same extent.
    let extent = block_len.div_ceil(512) * 512;
    let dram_bytes = (blocks.max(1) * extent).div_ceil(4096) * 4096;
    ensure!(
        dram_bytes >= 1 << 20,
        "{blocks} blocks of {block_bytes} bytes make {dram_bytes} bytes of DRAM, under the \
         engine's 1 MiB minimum: use larger blocks"
    );
    Ok(EngineConfig {
        dram_capacity_bytes: dram_bytes as u64,
        high_watermark_percent: 100,
        low_watermark_percent: 99,
        eviction_policy: policy,
        ..EngineConfig::default()
    })
}

/// Replays `trace` against a real engine: for each request `prefix_match`, a verified read
/// of every hit block, then `put_chain_with` of the blocks from the first miss on, linked to the
/// last hit block. Keys are the 8 bytes of a block id; payloads are `block_bytes` long and
/// carry their block id, so every read is checked.
///
/// # Errors
///
/// The engine cannot be opened, or a put or read fails.
pub fn replay_engine(
    trace: &Trace,
    setup: &EngineReplay,
    progress: impl FnMut(usize),
) -> anyhow::Result<EngineHits> {
    let mut config = dram_config(setup.policy, setup.dram_blocks, setup.block_bytes)?;
    if let Some((dir, nvme_blocks)) = &setup.nvme {
        let nvme_extent = mooncake_kv_engine::format::encoded_len(8, setup.block_bytes, 4096)
            .div_ceil(4096)
            * 4096;
        config.data_dir = Some(dir.clone());
        config.nvme_capacity_bytes = ((nvme_blocks.max(&1) * nvme_extent) as u64).max(1 << 20);
        config.nvme_high_watermark_percent = 100;
        config.nvme_low_watermark_percent = 99;
        config.promote_on_hit = true;
    }
    let engine = Engine::open(config).context("cannot open the replay engine")?;
    drive(trace, setup, &mut OneEngine(&engine), progress)
}

/// [`replay_engine`] against a cluster of `shape.nodes` real nodes on 127.0.0.1, each with
/// DRAM for `setup.dram_blocks x R / N` blocks, through a `ClusterClient` placing each block
/// on `shape.replicas` of them: per request its `prefix_match`, a verified `get` of every hit
/// block, `put_chain` of the blocks from the first miss on (each acknowledged by every
/// replica), and `end_chain` where `setup.ended` says. DRAM only (`setup.nvme` is ignored);
/// the counts of DRAM hits and evictions are summed over the nodes.
///
/// # Errors
///
/// A node cannot start, the members are not all live within 30 s, or a put or read fails.
pub fn replay_cluster(
    trace: &Trace,
    setup: &EngineReplay,
    shape: ClusterShape,
    progress: impl FnMut(usize),
) -> anyhow::Result<EngineHits> {
    use mooncake_kv_replication::cluster::{ClusterClient, ClusterConfig};
    use mooncake_kv_replication::membership::StaticConfig;
    use mooncake_kv_replication::{Node, NodeConfig};

    let engine = EngineConfig {
        hold_chain_parents: shape.holds_chain_parents(),
        ..dram_config(
            setup.policy,
            shape.per_node(setup.dram_blocks),
            setup.block_bytes,
        )?
    };
    let nodes = (0..shape.nodes)
        .map(|_| {
            Node::start(NodeConfig {
                listen: "127.0.0.1:0".into(),
                data_listen: "127.0.0.1:0".into(),
                engine: engine.clone(),
                ..NodeConfig::default()
            })
        })
        .collect::<Result<Vec<Node>, _>>()
        .context("cannot start a replay node")?;
    let cluster = ClusterClient::new(ClusterConfig {
        membership: StaticConfig {
            peers: nodes.iter().map(Node::control_addr).collect(),
            // Every member at full weight from the start, and none declared dead because a
            // busy machine answered a heartbeat late: placement stays put for the replay.
            join_ramp: Duration::ZERO,
            suspect_after: Duration::from_secs(60),
            dead_after: Duration::from_secs(120),
            ..StaticConfig::default()
        }
        .into(),
        replication_factor: shape.replicas,
        write_quorum: shape.replicas,
        ..ClusterConfig::default()
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.membership().live_members().len() < shape.nodes {
        ensure!(
            Instant::now() < deadline,
            "the replay nodes never all answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = drive(trace, setup, &mut Cluster(&cluster, &nodes), progress)?;
    drop(cluster);
    for node in nodes {
        node.shutdown(Duration::from_secs(1))
            .context("a replay node did not stop")?;
    }
    Ok(out)
}

/// What a replay runs its requests against.
trait Target {
    fn prefix_match(&mut self, keys: &[&[u8]]) -> anyhow::Result<usize>;
    /// The value of `key`, if it is still there.
    fn get(&mut self, key: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<bool>;
    fn put_chain(
        &mut self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> anyhow::Result<()>;
    fn end_chain(&mut self, keys: &[&[u8]]) -> anyhow::Result<()>;
    /// Reads served so far by DRAM and by NVMe, and blocks evicted from DRAM.
    fn tier_counts(&self) -> (u64, u64, u64);
}

struct OneEngine<'a>(&'a Engine);

impl Target for OneEngine<'_> {
    fn prefix_match(&mut self, keys: &[&[u8]]) -> anyhow::Result<usize> {
        Ok(self.0.prefix_match(keys))
    }

    fn get(&mut self, key: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<bool> {
        Ok(match self.0.get_into(key, buf)? {
            Some(len) => {
                buf.truncate(len);
                true
            }
            None => false,
        })
    }

    fn put_chain(
        &mut self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> anyhow::Result<()> {
        for result in self.0.put_chain_with(parent, items, end) {
            result.context("a replay put failed")?;
        }
        Ok(())
    }

    fn end_chain(&mut self, keys: &[&[u8]]) -> anyhow::Result<()> {
        self.0.end_chain(keys);
        Ok(())
    }

    fn tier_counts(&self) -> (u64, u64, u64) {
        tier_counts(self.0)
    }
}

/// An engine's DRAM hits, NVMe hits and DRAM evictions, each tier found by its kind.
fn tier_counts(engine: &Engine) -> (u64, u64, u64) {
    let stats = engine.stats();
    let of = |kind| stats.tiers.iter().find(|t| t.kind == kind);
    let dram = of(TierKind::Dram);
    (
        dram.map_or(0, |t| t.hits),
        of(TierKind::Nvme).map_or(0, |t| t.hits),
        dram.map_or(0, |t| t.evictions),
    )
}

struct Cluster<'a>(
    &'a mooncake_kv_replication::cluster::ClusterClient,
    &'a [mooncake_kv_replication::Node],
);

impl Target for Cluster<'_> {
    fn prefix_match(&mut self, keys: &[&[u8]]) -> anyhow::Result<usize> {
        Ok(self.0.prefix_match(keys)?)
    }

    fn get(&mut self, key: &[u8], buf: &mut Vec<u8>) -> anyhow::Result<bool> {
        Ok(match self.0.get(key)? {
            Some(value) => {
                *buf = value;
                true
            }
            None => false,
        })
    }

    fn put_chain(
        &mut self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> anyhow::Result<()> {
        for result in self.0.put_chain(parent, items, end) {
            result.context("a replay put failed")?;
        }
        Ok(())
    }

    fn end_chain(&mut self, keys: &[&[u8]]) -> anyhow::Result<()> {
        self.0.end_chain(keys)?;
        Ok(())
    }

    fn tier_counts(&self) -> (u64, u64, u64) {
        self.1
            .iter()
            .fold((0, 0, 0), |(hits, nvme, evictions), node| {
                let (h, n, e) = tier_counts(node.engine());
                (hits + h, nvme + n, evictions + e)
            })
    }
}

/// The replay loop both targets share: for each request its `prefix_match`, a verified read
/// of every hit block, a chain put of the blocks from the first miss on (linked to the last
/// hit block, the last block partial when the prompt ends inside it), and `end_chain` where
/// `setup.ended` says.
fn drive(
    trace: &Trace,
    setup: &EngineReplay,
    target: &mut dyn Target,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<EngineHits> {
    let started = Instant::now();
    let mut out = EngineHits::default();
    let mut payload = vec![0u8; setup.block_bytes];
    let mut read_buf = Vec::new();
    let mut last_progress = Instant::now();
    for (number, request) in trace.requests.iter().enumerate() {
        let keys: Vec<[u8; 8]> = request.hash_ids.iter().map(|id| id.to_be_bytes()).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        let (dram_before, nvme_before, _) = target.tier_counts();
        let matched = target.prefix_match(&refs)?;
        out.hits.count(trace, request, matched);
        for (key, id) in refs[..matched].iter().zip(&request.hash_ids) {
            read_buf.resize(setup.block_bytes.max(8), 0);
            // A miss: evicted between the match and the read (another tier's reclaimer).
            if target.get(key, &mut read_buf)?
                && !(read_buf.len() == setup.block_bytes && carries(&read_buf, *id))
            {
                out.wrong_blocks += 1;
            }
        }
        let (dram_after, nvme_after, _) = target.tier_counts();
        out.dram_hit_blocks += dram_after - dram_before;
        out.nvme_hit_blocks += nvme_after - nvme_before;
        let values: Vec<Vec<u8>> = request.hash_ids[matched..]
            .iter()
            .map(|&id| {
                fill(&mut payload, id);
                payload.clone()
            })
            .collect();
        let items: Vec<(&[u8], &[u8])> = refs[matched..]
            .iter()
            .zip(&values)
            .map(|(key, value)| (*key, value.as_slice()))
            .collect();
        let parent = matched.checked_sub(1).map(|i| refs[i]);
        let end = if trace.ends_partial(request) {
            ChainEnd::Partial
        } else {
            ChainEnd::Full
        };
        target.put_chain(parent, &items, end)?;
        if setup.ended.get(number).copied().unwrap_or(false) {
            target.end_chain(&refs)?;
        }
        if last_progress.elapsed() > Duration::from_millis(200) {
            progress(number + 1);
            last_progress = Instant::now();
        }
    }
    progress(trace.requests.len());
    out.dram_evictions = target.tier_counts().2;
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Fills a payload that names its block: the id, then a pattern derived from it.
fn fill(payload: &mut [u8], id: u64) {
    let mut state = mix(id);
    for chunk in payload.chunks_mut(8) {
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    if payload.len() >= 8 {
        payload[..8].copy_from_slice(&id.to_le_bytes());
    }
}

/// Whether `payload` is the one [`fill`] makes for `id`.
fn carries(payload: &[u8], id: u64) -> bool {
    let mut expected = vec![0u8; payload.len()];
    fill(&mut expected, id);
    expected == payload
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn trace(chains: &[&[u64]]) -> Trace {
        Trace {
            requests: chains
                .iter()
                .map(|c| Request {
                    input_length: c.len() as u64 * 4 - 1,
                    hash_ids: c.to_vec(),
                })
                .collect(),
            tokens_per_block: 4,
        }
    }

    #[test]
    fn counts_prefix_hits_in_blocks_and_tokens() {
        let t = trace(&[&[1, 2, 3], &[1, 2, 4], &[5, 2, 3]]);
        let h = t.ceiling();
        // Second request: 1 and 2 hit; third: 5 misses, so 2 and 3 do not count.
        assert_eq!((h.hit_blocks, h.blocks), (2, 9));
        assert_eq!((h.hit_tokens, h.tokens), (8, 3 * 11));
        for kind in EvictionPolicyKind::ALL {
            assert_eq!(simulate(&t, kind, 100), h, "{kind}");
        }
        assert_eq!(belady(&t, 100), h);
    }

    #[test]
    fn a_prompt_ends_partial_only_inside_its_last_block() {
        let request = |input_length, blocks: u64| Request {
            input_length,
            hash_ids: (0..blocks).collect(),
        };
        let t = trace(&[]);
        // 4 tokens per block.
        assert!(t.ends_partial(&request(7, 2)));
        assert!(!t.ends_partial(&request(8, 2)));
        assert!(t.ends_partial(&request(1, 1)));
        // Lengths that disagree with the chain count as full blocks, as in the token count.
        assert!(!t.ends_partial(&request(100, 2)));
        assert!(!t.ends_partial(&request(3, 2)));
        assert!(!t.ends_partial(&request(5, 0)));
    }

    #[test]
    fn belady_beats_lru_on_a_loop() {
        // A loop over 4 chains of 2 blocks with room for 6 blocks: LRU always misses.
        let chains: Vec<Vec<u64>> = (0..40)
            .map(|i| vec![(i % 4) * 2, (i % 4) * 2 + 1])
            .collect();
        let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
        let t = trace(&refs);
        let lru = simulate(&t, EvictionPolicyKind::Lru, 6);
        let min = belady(&t, 6);
        assert_eq!(lru.hit_blocks, 0);
        assert!(min.hit_blocks > 40, "{min:?}");
    }

    #[test]
    fn cluster_shapes_parse_and_refuse_what_cannot_be() {
        let shape: ClusterShape = "3x2".parse().unwrap();
        assert_eq!(
            shape,
            ClusterShape {
                nodes: 3,
                replicas: 2
            }
        );
        assert_eq!(shape.to_string(), "3x2");
        assert_eq!(shape.per_node(10), 7);
        assert_eq!("1X1".parse::<ClusterShape>(), Ok(ClusterShape::SINGLE));
        for bad in [
            "3", "x2", "3x", "0x1", "2x0", "2x3", "300x1", "-1x1", "3x2x1",
        ] {
            assert!(bad.parse::<ClusterShape>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cluster_with_room_for_everything_hits_every_repeat() {
        let t = conversations();
        let unique = t.unique_blocks();
        for shape in ["1x1", "3x1", "3x2", "5x3", "4x4"] {
            let shape: ClusterShape = shape.parse().unwrap();
            for kind in [EvictionPolicyKind::Lru, EvictionPolicyKind::PrefixAware] {
                let hits = simulate_cluster(&t, kind, unique, shape, &[]);
                assert_eq!(hits, t.ceiling(), "{kind} on {shape}");
            }
        }
    }

    #[test]
    fn each_member_holds_its_share_of_the_capacity() {
        // Two members, one copy each: room for 2 blocks in all, 1 on each.
        let shape: ClusterShape = "2x1".parse().unwrap();
        let members = [Member::full(0), Member::full(1)];
        let member_of = |id: u64| placement::replicas(&id.to_le_bytes(), &members, 1)[0];
        let a = 0;
        let same = (1..).find(|&id| member_of(id) == member_of(a)).unwrap();
        let other = (1..).find(|&id| member_of(id) != member_of(a)).unwrap();
        let lru = EvictionPolicyKind::Lru;
        // a and `other` live on different members: both stay, as in one cache of 2.
        let t = trace(&[&[a], &[other], &[a], &[other]]);
        assert_eq!(simulate_cluster(&t, lru, 2, shape, &[]).hit_blocks, 2);
        assert_eq!(simulate(&t, lru, 2).hit_blocks, 2);
        // a and `same` share a member with room for one: the second pushes the first out,
        // where one cache of 2 would have kept both.
        let t = trace(&[&[a], &[same], &[a]]);
        assert_eq!(simulate_cluster(&t, lru, 2, shape, &[]).hit_blocks, 0);
        assert_eq!(simulate(&t, lru, 2).hit_blocks, 1);
        // With a second copy of each block, each member has room for two.
        let both: ClusterShape = "2x2".parse().unwrap();
        assert_eq!(simulate_cluster(&t, lru, 2, both, &[]).hit_blocks, 1);
    }

    #[test]
    fn the_reuse_oracle_caches_only_blocks_with_a_future() {
        // Chain [1, 2] comes back after three one-off chains that fill a cache of 6 blocks:
        // LRU has let it go; LRU that skips the one-offs keeps it.
        let t = trace(&[&[1, 2], &[10, 11], &[12, 13], &[14, 15], &[1, 2], &[3]]);
        assert_eq!(simulate(&t, EvictionPolicyKind::Lru, 6).hit_blocks, 0);
        assert_eq!(lru_with_reuse_oracle(&t, 6).hit_blocks, 2);
        // With room for everything it is the ceiling; with room for nothing, no hits.
        assert_eq!(lru_with_reuse_oracle(&t, 100), t.ceiling());
        assert_eq!(lru_with_reuse_oracle(&t, 0).hit_blocks, 0);
    }

    #[test]
    fn the_engine_replay_agrees_with_the_simulation_when_nothing_is_evicted() {
        let chains: Vec<Vec<u64>> = (0..200u64)
            .map(|i| (0..(i % 7 + 1)).map(|j| (i % 13) * 10 + j).collect())
            .collect();
        let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
        let t = trace(&refs);
        let setup = EngineReplay {
            policy: EvictionPolicyKind::PrefixAware,
            dram_blocks: 1000,
            block_bytes: 1024,
            nvme: None,
            ended: Vec::new(),
        };
        let got = replay_engine(&t, &setup, |_| {}).unwrap();
        assert_eq!(got.hits, t.ceiling());
        assert_eq!(got.wrong_blocks, 0);
        assert_eq!(got.dram_hit_blocks, got.hits.hit_blocks);
    }

    #[test]
    fn a_chain_ends_where_nothing_after_its_head_is_used_again() {
        let t = trace(&[&[0, 1, 2], &[0, 1, 2, 3], &[0, 4], &[0, 5], &[0], &[0, 5]]);
        // Request 0 goes on in request 1; requests 1 and 2 are the last of theirs; request 3
        // goes on in request 5; a chain of its head alone is shared, never ended.
        assert_eq!(
            t.ended_chains(1.0),
            vec![false, true, true, false, false, true]
        );
        assert_eq!(t.ended_chains(0.0), vec![false; 6]);
        // A fraction marks about that share of the ended chains.
        let chains: Vec<Vec<u64>> = (0..4000).map(|i| vec![0, i + 1]).collect();
        let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
        let marked = trace(&refs)
            .ended_chains(0.25)
            .iter()
            .filter(|&&e| e)
            .count();
        assert!((900..1100).contains(&marked), "{marked} of 4000");
    }

    /// Conversations under a shared head block 0: a fifth go on for several turns, the rest
    /// end after one; each turn adds two blocks to its conversation's chain.
    fn conversations() -> Trace {
        let mut chains: Vec<Vec<u64>> = Vec::new();
        let mut open: Vec<(Vec<u64>, u64)> = Vec::new();
        let mut state = 7u64;
        let mut next_block = 1;
        for _ in 0..4000 {
            state = mix(state);
            if open.is_empty() || state % 3 != 0 {
                let turns = if (state >> 8) % 5 == 0 { 6 } else { 1 };
                open.push((vec![0], turns));
            }
            let pick = (state >> 16) as usize % open.len().min(8);
            let at = open.len() - 1 - pick;
            let (chain, turns) = &mut open[at];
            chain.extend([next_block, next_block + 1]);
            next_block += 2;
            chains.push(chain.clone());
            *turns -= 1;
            if *turns == 0 {
                open.remove(at);
            }
        }
        let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
        trace(&refs)
    }

    #[test]
    fn end_hints_keep_the_conversations_that_go_on() {
        let t = conversations();
        let capacity = t.unique_blocks() / 20;
        let ended = t.ended_chains(1.0);
        let plain = simulate(&t, EvictionPolicyKind::PrefixAware, capacity).block_ratio();
        let hinted = simulate_with_hints(&t, EvictionPolicyKind::PrefixAware, capacity, &ended)
            .block_ratio();
        assert!(hinted > plain + 0.1, "hinted {hinted:.3}, plain {plain:.3}");
        // LRU ignores the hint.
        assert_eq!(
            simulate_with_hints(&t, EvictionPolicyKind::Lru, capacity, &ended),
            simulate(&t, EvictionPolicyKind::Lru, capacity)
        );
        // The engine, told through `end_chain`, does what the simulation does.
        let setup = EngineReplay {
            policy: EvictionPolicyKind::PrefixAware,
            dram_blocks: capacity,
            block_bytes: 8192,
            nvme: None,
            ended,
        };
        let engine = replay_engine(&t, &setup, |_| {}).unwrap();
        assert_eq!(engine.wrong_blocks, 0);
        let e = engine.hits.block_ratio();
        assert!(
            (e - hinted).abs() < 0.02,
            "engine {e:.3}, simulated {hinted:.3}"
        );
    }

    #[test]
    fn the_engine_replay_tracks_the_simulated_policy_under_eviction() {
        // Chains that share heads, with room for a fifth of the blocks.
        let mut chains = Vec::new();
        let mut state = 7u64;
        for _ in 0..3000 {
            state = mix(state);
            let conversation = state % 150;
            let len = 2 + (state >> 20) % 6;
            chains.push(
                (0..len)
                    .map(|j| conversation * 100 + j)
                    .collect::<Vec<u64>>(),
            );
        }
        let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
        let t = trace(&refs);
        let capacity = t.unique_blocks() / 5;
        for kind in EvictionPolicyKind::ALL {
            let setup = EngineReplay {
                policy: kind,
                dram_blocks: capacity,
                block_bytes: 8192,
                nvme: None,
                ended: Vec::new(),
            };
            let engine = replay_engine(&t, &setup, |_| {}).unwrap();
            let sim = simulate(&t, kind, capacity);
            assert_eq!(engine.wrong_blocks, 0);
            let (e, s) = (engine.hits.block_ratio(), sim.block_ratio());
            assert!(
                (e - s).abs() < 0.05,
                "{kind}: engine {e:.3} vs simulation {s:.3}"
            );
            assert!(belady(&t, capacity).block_ratio() >= s, "{kind}: beat MIN");
        }
    }

    #[test]
    fn the_cluster_replay_tracks_its_simulation() {
        // As above, on three real nodes holding each block twice, through a cluster client.
        let mut chains = Vec::new();
        let mut state = 11u64;
        for _ in 0..1500 {
            state = mix(state);
            let conversation = state % 150;
            let len = 2 + (state >> 20) % 6;
            chains.push(
                (0..len)
                    .map(|j| conversation * 100 + j)
                    .collect::<Vec<u64>>(),
            );
        }
        let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
        let t = trace(&refs);
        let capacity = t.unique_blocks() / 5;
        let shape: ClusterShape = "3x2".parse().unwrap();
        let ended = t.ended_chains(1.0);
        for (kind, ended) in [
            (EvictionPolicyKind::Lru, Vec::new()),
            (EvictionPolicyKind::PrefixAware, ended),
        ] {
            let setup = EngineReplay {
                policy: kind,
                dram_blocks: capacity,
                block_bytes: 16 << 10,
                nvme: None,
                ended: ended.clone(),
            };
            let cluster = replay_cluster(&t, &setup, shape, |_| {}).unwrap();
            let sim = simulate_cluster(&t, kind, capacity, shape, &ended);
            assert_eq!(cluster.wrong_blocks, 0);
            assert!(cluster.dram_evictions > 0);
            assert!(cluster.hits.hit_blocks > 0);
            let (c, s) = (cluster.hits.block_ratio(), sim.block_ratio());
            assert!(
                (c - s).abs() < 0.05,
                "{kind}: cluster {c:.3} vs simulation {s:.3}"
            );
        }
    }

    #[test]
    fn rejects_malformed_traces_with_the_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(
            f,
            r#"{{"timestamp": 0, "input_length": 10, "hash_ids": [1, 2]}}"#
        )
        .unwrap();
        writeln!(f).unwrap();
        writeln!(f, r#"{{"timestamp": 1, "hash_ids": [1]}}"#).unwrap();
        drop(f);
        let err = format!("{:#}", Trace::load(&path, 512).unwrap_err());
        assert!(err.contains("t.jsonl:3"), "{err}");
        assert!(err.contains("input_length"), "{err}");

        std::fs::write(&path, "").unwrap();
        assert!(format!("{:#}", Trace::load(&path, 512).unwrap_err()).contains("no requests"));
        std::fs::write(&path, r#"{"input_length": 5, "hash_ids": [-1]}"#).unwrap();
        assert!(Trace::load(&path, 512).is_err());
        assert!(Trace::load(&dir.path().join("missing"), 512).is_err());

        std::fs::write(&path, "{\"input_length\": 700, \"hash_ids\": [3, 4]}\n").unwrap();
        let t = Trace::load(&path, 512).unwrap();
        assert_eq!(t.requests[0].hash_ids, vec![3, 4]);
        assert_eq!(t.ceiling().tokens, 700);
    }
}
