//! Repair: when the live membership changes, a node re-places every block it holds and copies
//! each one to the replicas that should hold it now and do not, at a bounded rate.
//!
//! Every holder of a block pushes it; a replica that already has it is skipped after an
//! `exists` check, so the copies stay few. A block whose every replica died is gone: this is
//! a cache, and the next request recomputes it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_kv_engine::Engine;

use crate::membership::{Liveness, Membership, MembershipConfig};
use crate::placement;

/// How long blocks brought back from disk wait for other members to show up before they are
/// served anyway (a node alone has nothing to reconcile with).
const RECONCILE_WAIT: Duration = Duration::from_secs(30);
use crate::{Client, ClientConfig};

/// How a node takes part in repair.
#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// The cluster's members (this node included) and how they are watched. With etcd, the
    /// node registers itself (its member id and control address) when repair starts.
    pub membership: MembershipConfig,
    /// Replicas of each block (R).
    pub replication_factor: usize,
    /// Most bytes copied per second. Default 256 MiB/s.
    pub bytes_per_second: u64,
    /// How peers are reached.
    pub client: ClientConfig,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            membership: MembershipConfig::default(),
            replication_factor: 2,
            bytes_per_second: 256 << 20,
            client: ClientConfig::default(),
        }
    }
}

/// Repair's figures.
#[derive(Debug, Default)]
pub struct RepairStats {
    /// Blocks brought back from disk that a live member also held: replaced by that copy (or
    /// dropped, when this node is not one of their replicas now).
    pub reconciled_superseded: AtomicU64,
    /// Blocks brought back from disk that no live member held: kept (and copied out).
    pub reconciled_kept: AtomicU64,
    /// Passes over the node's blocks (one per membership change).
    pub passes: AtomicU64,
    /// Blocks copied to a replica that lacked them.
    pub blocks_copied: AtomicU64,
    /// Bytes of those blocks.
    pub bytes_copied: AtomicU64,
    /// Copies that failed (retried at the next pass).
    pub failures: AtomicU64,
    /// Blocks left to examine in the pass under way.
    pub pending: AtomicU64,
    /// Replicas found missing by the current or last pass and not yet copied.
    pub under_replicated: AtomicU64,
}

impl RepairStats {
    /// The figures, as `stats` reports them.
    pub fn figures(&self) -> crate::proto::RepairFigures {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        crate::proto::RepairFigures {
            passes: load(&self.passes),
            blocks_copied: load(&self.blocks_copied),
            failures: load(&self.failures),
            under_replicated: load(&self.under_replicated),
        }
    }
}

/// The repair worker of one node; dropping it stops it.
#[derive(Debug)]
pub(crate) struct Repair {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<RepairStats>,
}

impl Repair {
    /// Starts watching the membership and repairing `engine`'s blocks. `self_id` is this
    /// node's member id.
    ///
    /// # Errors
    ///
    /// If a thread cannot be started.
    pub(crate) fn start(
        engine: Arc<EngineHandle>,
        self_id: u64,
        config: RepairConfig,
    ) -> std::io::Result<Self> {
        let membership = config.membership.start()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RepairStats::default());
        let thread = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::Builder::new()
                .name("mooncake-repair".into())
                .spawn(move || {
                    let mut worker = Worker {
                        engine,
                        self_id,
                        config,
                        membership,
                        clients: HashMap::new(),
                        stats,
                    };
                    worker.run(&stop);
                })?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    pub(crate) fn stats_shared(&self) -> &Arc<RepairStats> {
        &self.stats
    }
}

impl Drop for Repair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What repair needs of the node: its engine (shared with the node's threads), and the line
/// below which the node hides blocks it brought back from disk until they are reconciled.
pub(crate) trait EngineAccess: Send + Sync {
    fn engine(&self) -> &Engine;
    /// Blocks with a generation below this are not served (0: none hidden).
    fn hidden_below(&self) -> &std::sync::atomic::AtomicU64;
}

pub(crate) type EngineHandle = dyn EngineAccess;

struct Worker {
    engine: Arc<EngineHandle>,
    self_id: u64,
    config: RepairConfig,
    membership: Box<dyn Membership>,
    clients: HashMap<u64, Client>,
    stats: Arc<RepairStats>,
}

impl Worker {
    fn run(&mut self, stop: &AtomicBool) {
        let mut repaired_for: Option<BTreeSet<u64>> = None;
        let mut dirty = false;
        let mut waited = Duration::ZERO;
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(self.membership.period());
            waited += self.membership.period();
            if self.engine.hidden_below().load(Ordering::Acquire) != 0 {
                // Blocks brought back from disk wait for a view with other members in it (or
                // for long enough that nobody else is coming, or for a view of this node
                // alone) before they are served again.
                let others = self
                    .membership
                    .live_members()
                    .iter()
                    .filter(|m| m.id != self.self_id)
                    .count();
                let view = self.membership.view();
                let settled = view.iter().all(|p| p.liveness != Liveness::Suspect);
                // A member list of this node alone (once it has seen itself: answered its own
                // heartbeat, or found its own registration) has nobody to reconcile with. An
                // empty view (etcd not read yet) is not that.
                let alone = !view.is_empty() && view.iter().all(|p| p.id == Some(self.self_id));
                if (others > 0 && settled) || alone || waited > RECONCILE_WAIT {
                    self.reconcile(stop);
                    // Copy out what only this node had.
                    dirty = true;
                }
                continue;
            }
            let live: BTreeSet<u64> = self
                .membership
                .live_members()
                .iter()
                .map(|m| m.id)
                .collect();
            // Only a settled view (nobody suspect) is worth a pass; the first view is the
            // baseline, not a change.
            let settled = self
                .membership
                .view()
                .iter()
                .all(|p| p.liveness != Liveness::Suspect);
            if !settled || !live.contains(&self.self_id) {
                continue;
            }
            match &repaired_for {
                None => repaired_for = Some(live),
                Some(previous) if *previous != live || dirty => {
                    dirty = !self.pass(stop);
                    repaired_for = Some(live);
                }
                Some(_) => {}
            }
        }
    }

    /// One pass over every block; returns whether every copy it attempted succeeded.
    fn pass(&mut self, stop: &AtomicBool) -> bool {
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        let members = self.membership.live_members();
        let addrs: HashMap<u64, SocketAddr> = self
            .membership
            .view()
            .into_iter()
            .filter(|p| p.liveness == Liveness::Live)
            .filter_map(|p| Some((p.id?, p.addr)))
            .collect();
        let keys = self.engine.engine().keys();
        self.stats
            .pending
            .store(keys.len() as u64, Ordering::Relaxed);
        self.stats.under_replicated.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let mut copied_bytes = 0u64;
        let mut clean = true;
        for key in keys {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            for id in placement::replicas(&key, &members, self.config.replication_factor) {
                if id == self.self_id {
                    continue;
                }
                let Some(&addr) = addrs.get(&id) else {
                    continue;
                };
                match self.copy_if_missing(id, addr, &key) {
                    Ok(0) => {}
                    Ok(bytes) => {
                        copied_bytes += bytes;
                        self.stats.blocks_copied.fetch_add(1, Ordering::Relaxed);
                        self.stats.bytes_copied.fetch_add(bytes, Ordering::Relaxed);
                        // Stay under the rate: sleep off any lead over it.
                        let due = Duration::from_secs_f64(
                            copied_bytes as f64 / self.config.bytes_per_second.max(1) as f64,
                        );
                        if let Some(lead) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(lead);
                        }
                    }
                    Err(error) => {
                        clean = false;
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        self.clients.remove(&id);
                        tracing::debug!(%error, %addr, "repair copy failed; retried next pass");
                    }
                }
            }
        }
        clean
    }

    /// Reconciles the blocks this node brought back from disk with the live members: a block
    /// another member holds was written (or kept) while this node was away, so that copy wins:
    /// this node takes it if it is one of the block's replicas now, and drops its own
    /// otherwise. A block nobody else holds is kept (repair then copies it out). Only the
    /// block of the generation read from disk is replaced or dropped, so a put that reached
    /// this node meanwhile stays. Then the blocks are served again.
    fn reconcile(&mut self, stop: &AtomicBool) {
        let below = self.engine.hidden_below().load(Ordering::Acquire);
        let members = self.membership.live_members();
        let addrs: HashMap<u64, SocketAddr> = self
            .membership
            .view()
            .into_iter()
            .filter(|p| p.liveness == Liveness::Live && p.id != Some(self.self_id))
            .filter_map(|p| Some((p.id?, p.addr)))
            .collect();
        let engine = self.engine.engine();
        let old: Vec<(Vec<u8>, u64)> = engine
            .keys()
            .into_iter()
            .filter_map(|key| {
                let generation = engine.generation(&key)?;
                (generation < below).then_some((key, generation))
            })
            .collect();
        // Which of them each other member holds, asked in batches.
        let mut holders: Vec<Vec<u64>> = vec![Vec::new(); old.len()];
        for (&id, &addr) in &addrs {
            for (chunk_index, chunk) in old.chunks(512).enumerate() {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let keys: Vec<&[u8]> = chunk.iter().map(|(k, _)| k.as_slice()).collect();
                let held = self.client(id, addr).and_then(|c| c.exists(&keys));
                match held {
                    Ok(flags) => {
                        for (i, held) in flags.into_iter().enumerate() {
                            if held {
                                holders[chunk_index * 512 + i].push(id);
                            }
                        }
                    }
                    Err(error) => {
                        self.clients.remove(&id);
                        tracing::warn!(%error, %addr, "reconciliation: cannot ask a member");
                    }
                }
            }
        }
        for ((key, generation), holders) in old.iter().zip(&holders) {
            if stop.load(Ordering::Acquire) {
                return;
            }
            if holders.is_empty() {
                self.stats.reconciled_kept.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let replica_here = placement::replicas(key, &members, self.config.replication_factor)
                .contains(&self.self_id);
            let fetched = if replica_here {
                holders.iter().find_map(|id| {
                    let addr = *addrs.get(id)?;
                    self.client(*id, addr).ok()?.get(key).ok()?
                })
            } else {
                None
            };
            let engine = self.engine.engine();
            match fetched {
                // Overwrite only the block read from disk, not a put that came since.
                Some(value) if engine.generation(key) == Some(*generation) => {
                    if let Err(error) = engine.put(key, &value) {
                        tracing::warn!(%error, "reconciliation: cannot store a block; dropping ours");
                        engine.remove_generation(key, *generation);
                    }
                }
                _ => {
                    engine.remove_generation(key, *generation);
                }
            }
            self.stats
                .reconciled_superseded
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            superseded = self.stats.reconciled_superseded.load(Ordering::Relaxed),
            kept = self.stats.reconciled_kept.load(Ordering::Relaxed),
            "blocks brought back from disk reconciled with the cluster; serving them"
        );
        self.engine.hidden_below().store(0, Ordering::Release);
    }

    fn client(&mut self, id: u64, addr: SocketAddr) -> Result<&Client, crate::ClientError> {
        if !self.clients.contains_key(&id) {
            let client = Client::connect(addr, self.config.client.clone())?;
            self.clients.insert(id, client);
        }
        Ok(&self.clients[&id])
    }

    /// Copies `key`'s block to member `id` unless it has it; returns the bytes copied.
    fn copy_if_missing(
        &mut self,
        id: u64,
        addr: SocketAddr,
        key: &[u8],
    ) -> Result<u64, crate::ClientError> {
        if !self.clients.contains_key(&id) {
            let client = Client::connect(addr, self.config.client.clone())?;
            self.clients.insert(id, client);
        }
        let Some(client) = self.clients.get(&id) else {
            return Ok(0);
        };
        if client.exists(&[key])?.first() == Some(&true) {
            return Ok(0);
        }
        self.stats.under_replicated.fetch_add(1, Ordering::Relaxed);
        // Removed or evicted meanwhile: nothing to copy.
        let Ok(Some(pinned)) = self.engine.engine().pin(key) else {
            return Ok(0);
        };
        client.put(key, pinned.payload())?;
        self.stats.under_replicated.fetch_sub(1, Ordering::Relaxed);
        Ok(pinned.payload().len() as u64)
    }
}
