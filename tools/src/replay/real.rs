//! Replays on real stores: an [`Engine`](mooncake_kv_engine::Engine) in this process, or real nodes behind a cluster
//! client, with every hit read back and checked byte for byte.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use mooncake_kv_engine::eviction::EvictionPolicyKind;
use mooncake_kv_engine::{ChainEnd, Engine, EngineConfig, TierKind};
use serde::Serialize;

use super::*;

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
        // The policies remember keys by the index's hash: a fixed one makes a replay repeat.
        index_hash_seed: Some(REPLAY_HASH_SEED),
        ..EngineConfig::default()
    })
}

/// The index hash seed of every replayed engine (and of the simulation's key hashes).
pub(crate) const REPLAY_HASH_SEED: u64 = 0x6d6f_6f6e_6361_6b65;

/// A block id's key in a replayed engine.
pub(crate) fn block_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
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
        Ok(read_into(self.0.get_into(key, buf)?, buf))
    }

    fn put_chain(
        &mut self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> anyhow::Result<()> {
        all_stored(self.0.put_chain_with(parent, items, end))
    }

    fn end_chain(&mut self, keys: &[&[u8]]) -> anyhow::Result<()> {
        self.0.end_chain(keys);
        Ok(())
    }

    fn tier_counts(&self) -> (u64, u64, u64) {
        tier_counts(self.0)
    }
}

/// Whether a `get_into` found its block, `buf` cut to the value's length if it did.
fn read_into(found: Option<usize>, buf: &mut Vec<u8>) -> bool {
    match found {
        Some(len) => {
            buf.truncate(len);
            true
        }
        None => false,
    }
}

/// `Ok` if every block of a chain put was stored, else the first failure.
fn all_stored<T, E>(results: Vec<Result<T, E>>) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    for result in results {
        result.context("a replay put failed")?;
    }
    Ok(())
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
        Ok(read_into(self.0.get_into(key, buf)?, buf))
    }

    fn put_chain(
        &mut self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> anyhow::Result<()> {
        all_stored(self.0.put_chain(parent, items, end))
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
        let keys: Vec<[u8; 8]> = request.hash_ids.iter().map(|&id| block_key(id)).collect();
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
