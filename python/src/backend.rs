//! The three things a store object can be (a node's client, a cluster's client, the engine
//! in this process) behind one set of operations, with one error type.

use mooncake_kv_client::cluster::ClusterClient;
use mooncake_kv_client::{ChainEnd, Client};

use crate::errors::{Result, StoreError};

/// Where the blocks are.
pub(crate) enum Backend {
    /// One `mooncake-kvd`.
    Node(Client),
    /// Several, with replicas.
    Cluster(ClusterClient),
    /// The engine, in this process.
    #[cfg(feature = "embedded")]
    Embedded(mooncake_kv_engine::Engine),
}

/// One figure of a tier.
pub(crate) struct TierFigures {
    pub(crate) name: String,
    pub(crate) blocks: u64,
    pub(crate) used_bytes: u64,
    pub(crate) capacity_bytes: u64,
    pub(crate) hits: u64,
    pub(crate) evictions: u64,
}

/// What `stats` reports: each tier, fastest first, and named counters.
pub(crate) struct Figures {
    pub(crate) tiers: Vec<TierFigures>,
    pub(crate) counters: Vec<(String, u64)>,
}

/// The same failure once per item of a request that failed as a whole.
fn each<T>(error: StoreError, n: usize) -> Vec<Result<T>> {
    (0..n).map(|_| Err(error.clone())).collect()
}

impl Backend {
    /// A short name for `repr` and `stats`: `node`, `cluster` or `embedded`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Node(_) => "node",
            Self::Cluster(_) => "cluster",
            #[cfg(feature = "embedded")]
            Self::Embedded(_) => "embedded",
        }
    }

    /// The data path reads take: `shm` or `tcp` for a node, `mixed` for a cluster (each
    /// member's own), `local` in process.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Self::Node(client) => client.transport_name(),
            Self::Cluster(_) => "mixed",
            #[cfg(feature = "embedded")]
            Self::Embedded(_) => "local",
        }
    }

    /// Stores each value under its key (replacing what was there). One outcome per item.
    pub(crate) fn put_batch(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<()>> {
        match self {
            Self::Node(client) => match client.put_batch(items, false) {
                Ok(outcomes) => outcomes
                    .into_iter()
                    .map(|o| o.map(drop).map_err(StoreError::from))
                    .collect(),
                Err(error) => each(error.into(), items.len()),
            },
            Self::Cluster(cluster) => cluster
                .put_batch(items)
                .into_iter()
                .map(|o| o.map(drop).map_err(Into::into))
                .collect(),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => engine
                .put_batch(items)
                .into_iter()
                .map(|o| o.map(drop).map_err(Into::into))
                .collect(),
        }
    }

    /// Stores one prefix chain, in order, the first block following `parent`.
    pub(crate) fn put_chain(
        &self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> Vec<Result<()>> {
        match self {
            Self::Node(client) => match client.put_chain(parent, items, end, false) {
                Ok(outcomes) => outcomes
                    .into_iter()
                    .map(|o| o.map(drop).map_err(StoreError::from))
                    .collect(),
                Err(error) => each(error.into(), items.len()),
            },
            Self::Cluster(cluster) => cluster
                .put_chain(parent, items, end)
                .into_iter()
                .map(|o| o.map(drop).map_err(Into::into))
                .collect(),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => engine
                .put_chain_with(parent, items, end)
                .into_iter()
                .map(|o| o.map(drop).map_err(Into::into))
                .collect(),
        }
    }

    /// The value of `key`, `None` for a miss.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Self::Node(client) => client.get(key).map_err(Into::into),
            Self::Cluster(cluster) => cluster.get(key).map_err(Into::into),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => engine.get(key).map_err(Into::into),
        }
    }

    /// Each value straight into its buffer; its length, `None` for a miss. A buffer smaller
    /// than its value is an error (nothing is truncated).
    pub(crate) fn get_into_batch(
        &self,
        items: &mut [(&[u8], &mut [u8])],
    ) -> Vec<Result<Option<usize>>> {
        match self {
            Self::Node(client) => client
                .get_into_batch(items)
                .into_iter()
                .map(|r| r.map_err(Into::into))
                .collect(),
            Self::Cluster(cluster) => cluster
                .get_into_batch(items)
                .into_iter()
                .map(|r| r.map_err(Into::into))
                .collect(),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => engine
                .get_into_batch(items)
                .into_iter()
                .map(|r| r.map_err(Into::into))
                .collect(),
        }
    }

    /// Which keys have blocks.
    pub(crate) fn exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        match self {
            Self::Node(client) => client.exists(keys).map_err(Into::into),
            Self::Cluster(cluster) => cluster.exists(keys).map_err(Into::into),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => Ok(engine.exists_batch(keys)),
        }
    }

    /// How many leading keys of the chain have blocks.
    pub(crate) fn prefix_match(&self, keys: &[&[u8]]) -> Result<usize> {
        match self {
            Self::Node(client) => client.prefix_match(keys).map_err(Into::into),
            Self::Cluster(cluster) => cluster.prefix_match(keys).map_err(Into::into),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => Ok(engine.prefix_match(keys)),
        }
    }

    /// The chain is over (a hint for eviction); whether any block of it was held.
    pub(crate) fn end_chain(&self, keys: &[&[u8]]) -> Result<bool> {
        match self {
            Self::Node(client) => client.end_chain(keys).map_err(Into::into),
            Self::Cluster(cluster) => cluster.end_chain(keys).map_err(Into::into),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => Ok(engine.end_chain(keys)),
        }
    }

    /// Removes blocks; which existed.
    pub(crate) fn remove(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        match self {
            Self::Node(client) => client.remove(keys).map_err(Into::into),
            Self::Cluster(cluster) => cluster.remove(keys).map_err(Into::into),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => Ok(engine.remove_batch(keys)),
        }
    }

    /// Removes every block; how many.
    pub(crate) fn remove_all(&self) -> Result<u64> {
        match self {
            Self::Node(client) => client.remove_all().map_err(Into::into),
            Self::Cluster(cluster) => cluster.remove_all().map_err(Into::into),
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => Ok(engine.remove_all()),
        }
    }

    /// Before closing: an embedded store with a data directory writes every block only in
    /// DRAM to it (as a node does when it stops), so that reopening it finds them all.
    pub(crate) fn flush_before_close(&self) -> Result<()> {
        match self {
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) if engine.config().data_dir.is_some() => {
                engine.flush().map(drop).map_err(Into::into)
            }
            _ => Ok(()),
        }
    }

    /// The figures.
    pub(crate) fn stats(&self) -> Result<Figures> {
        match self {
            Self::Node(client) => {
                let stats = client.stats()?;
                Ok(node_figures(&stats))
            }
            Self::Cluster(cluster) => {
                let members = cluster.membership().view();
                let live = members
                    .iter()
                    .filter(|p| {
                        matches!(p.liveness, mooncake_kv_client::membership::Liveness::Live)
                    })
                    .count();
                Ok(Figures {
                    tiers: Vec::new(),
                    counters: vec![
                        ("members".to_owned(), members.len() as u64),
                        ("live_members".to_owned(), live as u64),
                    ],
                })
            }
            #[cfg(feature = "embedded")]
            Self::Embedded(engine) => Ok(engine_figures(&engine.stats())),
        }
    }
}

fn node_figures(stats: &mooncake_kv_client::proto::NodeStats) -> Figures {
    let tiers = stats
        .tiers
        .iter()
        .map(|t| TierFigures {
            name: t.tier.clone(),
            blocks: t.blocks,
            used_bytes: t.used_bytes,
            capacity_bytes: t.capacity_bytes,
            hits: t.hits,
            evictions: t.evictions,
        })
        .collect();
    let mut counters: Vec<(String, u64)> = mooncake_kv_client::proto::REQUEST_KINDS
        .iter()
        .zip(&stats.requests)
        .map(|(kind, &n)| (format!("{kind}_requests"), n))
        .collect();
    counters.push(("errors".to_owned(), stats.errors));
    counters.push(("leases".to_owned(), stats.leases));
    counters.push(("connections".to_owned(), stats.connections));
    Figures { tiers, counters }
}

#[cfg(feature = "embedded")]
fn engine_figures(stats: &mooncake_kv_engine::EngineStats) -> Figures {
    let tiers = stats
        .tiers
        .iter()
        .map(|t| TierFigures {
            name: format!("{:?}", t.kind).to_lowercase(),
            blocks: t.blocks,
            used_bytes: t.used_bytes,
            capacity_bytes: t.capacity_bytes,
            hits: t.hits,
            evictions: t.evictions,
        })
        .collect();
    let counters = vec![
        ("puts".to_owned(), stats.puts),
        ("removes".to_owned(), stats.removes),
        ("demotions".to_owned(), stats.demotions),
        ("promotions".to_owned(), stats.promotions),
        ("corrupt_blocks".to_owned(), stats.corrupt_blocks),
    ];
    Figures { tiers, counters }
}
