//! A client of a cluster of nodes: replicated puts acknowledged by a write quorum, reads from
//! any replica that holds the block, failing over on errors, misses and verification
//! failures. Placement is computed here from the membership view (rendezvous hashing), so no
//! node is asked where a key lives.
//!
//! Prefix chains go through it too: [`ClusterClient::put_chain`] sends each member its share
//! of a chain (the blocks it holds a replica of, in chain order) as one linked put, so each
//! node's prefix-aware eviction ranks its share's tail below its head (and a node with peers
//! holds no block for a later one: see `EngineConfig::hold_chain_parents`);
//! [`ClusterClient::prefix_match`] asks every member holding a share at once;
//! [`ClusterClient::end_chain`] passes the caller's word that a chain is over to each share.
//!
//! Repair (copying blocks that lost a replica to their new owners) runs on the nodes: see
//! the node's repair (`mooncake_kv_replication::repair`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mooncake_kv_format::ChainEnd;
use parking_lot::Mutex;

use crate::membership::{Liveness, Membership, MembershipConfig};
use crate::placement;
use crate::proto::ErrorReply;
use crate::{Client, ClientConfig, ClientError};

/// Members, and for each the positions of the keys it holds a replica of, in key order.
type Shares = (Vec<(u64, SocketAddr)>, Vec<Vec<usize>>);

/// A snapshot of the live members to place keys by.
struct Placement {
    members: Vec<placement::Member>,
    addr_of: HashMap<u64, SocketAddr>,
    replication_factor: usize,
}

impl Placement {
    /// The members that hold `key`'s replicas, primary first, with their addresses.
    fn replicas(&self, key: &[u8]) -> Vec<(u64, SocketAddr)> {
        placement::replicas(key, &self.members, self.replication_factor)
            .into_iter()
            .filter_map(|id| Some((id, *self.addr_of.get(&id)?)))
            .collect()
    }
}

/// How a cluster client places and acknowledges blocks.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The members and how they are watched.
    pub membership: MembershipConfig,
    /// Replicas of each block (R). Default 2.
    pub replication_factor: usize,
    /// Replicas that must hold a block before a put is acknowledged (W). Default 2.
    pub write_quorum: usize,
    /// How each member is reached.
    pub client: ClientConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            membership: MembershipConfig::default(),
            replication_factor: 2,
            write_quorum: 2,
            client: ClientConfig::default(),
        }
    }
}

/// Why one replica did not take a put.
#[derive(Debug)]
pub struct ReplicaFailure {
    /// The member.
    pub member: u64,
    /// Its address.
    pub addr: SocketAddr,
    /// What happened.
    pub error: ClientError,
}

/// What a cluster call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Fewer replicas than the write quorum took the block.
    #[error("put held by {acked} of {wanted} replicas, {quorum} needed: {}", describe(.failures))]
    Quorum {
        /// Replicas that hold the block.
        acked: usize,
        /// Replicas asked.
        wanted: usize,
        /// The write quorum.
        quorum: usize,
        /// Why each other replica did not.
        failures: Vec<ReplicaFailure>,
    },
    /// No live member to ask.
    #[error("no live member")]
    NoLiveMember,
    /// Every replica failed (not merely missed) the read.
    #[error("every replica failed: {}", describe(.0))]
    AllReplicasFailed(Vec<ReplicaFailure>),
    /// The value is larger than the buffer given for it (a replica that holds it said so;
    /// nothing was written into the buffer).
    #[error("buffer too small: the value needs {needed} bytes, the buffer has {available}")]
    BufferTooSmall {
        /// The value's length.
        needed: usize,
        /// The buffer's.
        available: usize,
    },
    /// The settings do not make sense.
    #[error("bad cluster settings: {0}")]
    Config(String),
    /// The membership thread could not start.
    #[error("cannot start membership: {0}")]
    Io(#[from] std::io::Error),
}

fn describe(failures: &[ReplicaFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("{} (member {:#x}): {}", f.addr, f.member, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A client of a whole cluster.
#[derive(Debug)]
pub struct ClusterClient {
    config: ClusterConfig,
    membership: Box<dyn Membership>,
    /// One client per member id, opened on first use.
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    /// Requests this client has in flight to each member: its measure of their load.
    in_flight: Mutex<HashMap<u64, Arc<AtomicUsize>>>,
    /// Whether each address is on this host (cached: it is a system call to find out).
    local: Mutex<HashMap<std::net::IpAddr, bool>>,
}

/// Counts one request to a member for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The order to ask a key's replicas in: those on this host first (no network hop, and the
/// shared-memory transport), then the least loaded, placement order breaking ties. Each
/// replica is `(member id, is local, load)`, in placement order.
pub(crate) fn read_order(replicas: &[(u64, bool, usize)]) -> Vec<u64> {
    let mut ranked: Vec<(usize, &(u64, bool, usize))> = replicas.iter().enumerate().collect();
    ranked.sort_by_key(|&(rank, &(_, local, load))| (!local, load, rank));
    ranked.into_iter().map(|(_, &(id, _, _))| id).collect()
}

impl ClusterClient {
    /// Starts watching the members.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Config`] for R = 0 or W outside 1..=R; [`ClusterError::Io`] if the
    /// membership thread cannot start.
    pub fn new(config: ClusterConfig) -> Result<Self, ClusterError> {
        if config.replication_factor == 0
            || config.write_quorum == 0
            || config.write_quorum > config.replication_factor
        {
            return Err(ClusterError::Config(format!(
                "need 1 <= write_quorum ({}) <= replication_factor ({})",
                config.write_quorum, config.replication_factor
            )));
        }
        let membership = config.membership.start()?;
        Ok(Self {
            config,
            membership,
            clients: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
        })
    }

    /// The membership this client sees.
    pub fn membership(&self) -> &dyn Membership {
        &*self.membership
    }

    /// The members that hold `key`'s replicas now, primary first, with their addresses.
    pub fn replicas(&self, key: &[u8]) -> Vec<(u64, SocketAddr)> {
        self.placement().replicas(key)
    }

    /// The live members and their addresses as this client sees them now: one snapshot to
    /// place many keys by.
    fn placement(&self) -> Placement {
        let addr_of: HashMap<u64, SocketAddr> = self
            .membership
            .view()
            .iter()
            .filter(|p| p.liveness == Liveness::Live)
            .filter_map(|p| Some((p.id?, p.addr)))
            .collect();
        Placement {
            members: self.membership.live_members(),
            addr_of,
            replication_factor: self.config.replication_factor,
        }
    }

    fn client(&self, id: u64, addr: SocketAddr) -> Result<Arc<Client>, ClientError> {
        if let Some(client) = self.clients.lock().get(&id) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(Client::connect(addr, self.config.client.clone())?);
        // The address may now belong to another member (a node restarted empty).
        if crate::membership::member_id(&client.hello().node_id) != id {
            return Err(ClientError::Refused(ErrorReply {
                code: crate::proto::ErrorCode::BadRequest,
                message: format!("{addr} is no longer member {id:#x}"),
            }));
        }
        self.clients.lock().insert(id, Arc::clone(&client));
        Ok(client)
    }

    /// Marks one request to member `id` in flight until the guard drops.
    fn start_request(&self, id: u64) -> InFlight {
        let counter = Arc::clone(self.in_flight.lock().entry(id).or_default());
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    fn load(&self, id: u64) -> usize {
        self.in_flight
            .lock()
            .get(&id)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Whether `addr` is an address of this host: loopback, or one a socket can bind to.
    fn is_local(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip();
        *self.local.lock().entry(ip).or_insert_with(|| {
            ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
        })
    }

    /// Records that member `id` failed a call: its connection is dropped (reopened on next
    /// use) and the failure kept for the caller.
    fn failed(&self, id: u64, addr: SocketAddr, error: ClientError) -> ReplicaFailure {
        self.clients.lock().remove(&id);
        ReplicaFailure {
            member: id,
            addr,
            error,
        }
    }

    /// Stores `value` on the key's R replicas; acknowledged once W hold it. Returns the ids of
    /// the replicas that hold it.
    ///
    /// # Errors
    ///
    /// [`ClusterError::Quorum`] naming each replica that failed and why;
    /// [`ClusterError::NoLiveMember`].
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<Vec<u64>, ClusterError> {
        let replicas = self.replicas(key);
        if replicas.is_empty() {
            return Err(ClusterError::NoLiveMember);
        }
        let mut acked = Vec::new();
        let mut failures = Vec::new();
        for (id, addr, result) in self.each_member(&replicas, |_, client| client.put(key, value)) {
            match result {
                Ok(_) => acked.push(id),
                Err(error) => failures.push(self.failed(id, addr, error)),
            }
        }
        self.quorum(replicas.len(), acked, failures)
    }

    /// A put's outcome from the replicas that took it: `acked` of `wanted`, the others
    /// having failed as `failures` say.
    fn quorum(
        &self,
        wanted: usize,
        acked: Vec<u64>,
        failures: Vec<ReplicaFailure>,
    ) -> Result<Vec<u64>, ClusterError> {
        if wanted == 0 {
            return Err(ClusterError::NoLiveMember);
        }
        // Fewer live members than R: the quorum counts against what could be asked.
        let quorum = self.config.write_quorum.min(wanted);
        if acked.len() >= quorum {
            Ok(acked)
        } else {
            Err(ClusterError::Quorum {
                acked: acked.len(),
                wanted,
                quorum,
                failures,
            })
        }
    }

    /// Runs `call` against each of `members` at once (a thread each but one, which this
    /// thread takes: [`run_in_lanes`](mooncake_kv_transfer::run_in_lanes)), each counted in
    /// flight to its member. `call` gets the member's position in `members` and its client.
    /// One outcome per member, in the order of `members`.
    fn each_member<T: Send>(
        &self,
        members: &[(u64, SocketAddr)],
        call: impl Fn(usize, &Client) -> Result<T, ClientError> + Sync,
    ) -> Vec<(u64, SocketAddr, Result<T, ClientError>)> {
        // One lane per member, with nothing of its own to work on.
        let mut lanes = vec![(); members.len()];
        mooncake_kv_transfer::run_in_lanes(lanes.chunks_mut(1).collect(), |at, _| {
            let (id, addr) = members[at];
            let _in_flight = self.start_request(id);
            let result = self.client(id, addr).and_then(|client| call(at, &client));
            vec![(id, addr, result)]
        })
    }

    /// Where each of `keys` lives now: the members holding a replica of any, and for each
    /// member the positions of the keys it holds, in order.
    fn shares(&self, keys: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Shares {
        let placement = self.placement();
        let mut members: Vec<(u64, SocketAddr)> = Vec::new();
        let mut shares: Vec<Vec<usize>> = Vec::new();
        for (at, key) in keys.into_iter().enumerate() {
            for member in placement.replicas(key.as_ref()) {
                add_to_share(&mut members, &mut shares, member, at);
            }
        }
        (members, shares)
    }

    /// Stores the blocks of one prefix chain on their replicas, the first following `parent`
    /// (the key of the block before them, if the chain continues one the cluster may hold),
    /// `end` saying whether the last block is full or partial. Each block is placed by its own
    /// key, as [`put`](Self::put) places it; each member receives its share of the chain in
    /// one request, linked in chain order under `parent`, so its eviction ranks a share's tail
    /// below its head and `end_chain` can find the share (a member links a block to the
    /// nearest earlier block of the chain it holds, an ancestor). One outcome per item, in
    /// order, as [`put`](Self::put)'s: the replicas that hold the block, or why fewer than the
    /// write quorum do.
    ///
    /// A prefix is used from its head, so a caller that finds block `i` failed may count the
    /// blocks after it as lost too.
    pub fn put_chain(
        &self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
    ) -> Vec<Result<Vec<u64>, ClusterError>> {
        self.put_in_shares(items, |client, blocks, holds_last| {
            // Only the share holding the chain's last block ends partial.
            let end = if holds_last { end } else { ChainEnd::Full };
            client.put_chain(parent, blocks, end, false)
        })
    }

    /// Stores each of `items` on its replicas, as [`put`](Self::put) does: each member
    /// receives the blocks it is a replica of in one request, the members at once. One
    /// outcome per item, in order, as [`put`](Self::put)'s.
    pub fn put_batch(&self, items: &[(&[u8], &[u8])]) -> Vec<Result<Vec<u64>, ClusterError>> {
        self.put_in_shares(items, |client, blocks, _| client.put_batch(blocks, false))
    }

    /// Sends each member its share of `items` (the blocks it is a replica of, in order) with
    /// `send`, which is told whether the share holds the last item; the members at once. Each
    /// item's outcome is a put's: the replicas that took it, or why fewer than the write
    /// quorum did.
    fn put_in_shares(
        &self,
        items: &[(&[u8], &[u8])],
        send: impl Fn(
            &Client,
            &[(&[u8], &[u8])],
            bool,
        ) -> Result<Vec<Result<u64, ErrorReply>>, ClientError>
        + Sync,
    ) -> Vec<Result<Vec<u64>, ClusterError>> {
        let (members, shares) = self.shares(items.iter().map(|(key, _)| key));
        let last = items.len().saturating_sub(1);
        let outcomes = self.each_member(&members, |member, client| {
            let share = &shares[member];
            let blocks: Vec<(&[u8], &[u8])> = share.iter().map(|&at| items[at]).collect();
            send(client, &blocks, share.last() == Some(&last))
        });
        let mut acked: Vec<Vec<u64>> = vec![Vec::new(); items.len()];
        let mut wanted = vec![0usize; items.len()];
        let mut failures: Vec<Vec<ReplicaFailure>> = items.iter().map(|_| Vec::new()).collect();
        for ((id, addr, result), share) in outcomes.into_iter().zip(&shares) {
            for &at in share {
                wanted[at] += 1;
            }
            match result {
                Ok(per_block) => {
                    for (&at, outcome) in share.iter().zip(per_block) {
                        match outcome {
                            Ok(_) => acked[at].push(id),
                            Err(reply) => failures[at].push(ReplicaFailure {
                                member: id,
                                addr,
                                error: ClientError::Refused(reply),
                            }),
                        }
                    }
                }
                // The request failed as a whole: so did each block it carried.
                Err(error) => {
                    for &at in share {
                        failures[at].push(ReplicaFailure {
                            member: id,
                            addr,
                            error: error.duplicate(),
                        });
                    }
                    self.failed(id, addr, error);
                }
            }
        }
        acked
            .into_iter()
            .zip(failures)
            .zip(wanted)
            .map(|((acked, failures), wanted)| self.quorum(wanted, acked, failures))
            .collect()
    }

    /// How many leading keys of the prefix chain `keys` the cluster holds: a key counts if any
    /// of its replicas has its block. Every member holding a share is asked at once, one
    /// request each; a member that fails counts as holding nothing. A block written under an
    /// older membership and not yet moved by repair counts as missing (a miss, not an error;
    /// [`get`](Self::get) still finds it). Blocks may be evicted after the answer, so a read
    /// of a matched block can still miss.
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoLiveMember`]; [`ClusterError::AllReplicasFailed`] when every member
    /// asked failed.
    pub fn prefix_match(&self, keys: &[&[u8]]) -> Result<usize, ClusterError> {
        let held = self.exists(keys)?;
        Ok(held.iter().take_while(|&&h| h).count())
    }

    /// Says that the prefix chain `keys` (head first) is over: its conversation or task has
    /// ended, so nothing will extend it or read it again. Each member holding a share of it is
    /// told (see [`Client::end_chain`]), so their eviction lets the chain's blocks go first,
    /// up to blocks other chains share. Returns whether any member held a block of it. A hint:
    /// a member that fails is skipped.
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoLiveMember`]; [`ClusterError::AllReplicasFailed`] when every member
    /// asked failed.
    pub fn end_chain(&self, keys: &[&[u8]]) -> Result<bool, ClusterError> {
        if keys.is_empty() {
            return Ok(false);
        }
        let answers = self.ask_shares(keys, |client, share| client.end_chain(share))?;
        Ok(answers.into_iter().any(|(_, held)| held))
    }

    /// Asks every member holding a share of `keys` at once, `call` getting its client and its
    /// share (the keys it is a replica of, in order). Returns each answering member's share
    /// (positions in `keys`) with its answer; a member that failed is left out.
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoLiveMember`]; [`ClusterError::AllReplicasFailed`] when every member
    /// asked failed.
    fn ask_shares<T: Send>(
        &self,
        keys: &[&[u8]],
        call: impl Fn(&Client, &[&[u8]]) -> Result<T, ClientError> + Sync,
    ) -> Result<Vec<(Vec<usize>, T)>, ClusterError> {
        let (members, shares) = self.shares(keys);
        if members.is_empty() {
            return Err(ClusterError::NoLiveMember);
        }
        let outcomes = self.each_member(&members, |member, client| {
            let share: Vec<&[u8]> = shares[member].iter().map(|&at| keys[at]).collect();
            call(client, &share)
        });
        let mut answers = Vec::with_capacity(members.len());
        let mut failures = Vec::new();
        for ((id, addr, result), share) in outcomes.into_iter().zip(shares) {
            match result {
                Ok(answer) => answers.push((share, answer)),
                Err(error) => failures.push(self.failed(id, addr, error)),
            }
        }
        if answers.is_empty() {
            return Err(ClusterError::AllReplicasFailed(failures));
        }
        Ok(answers)
    }

    /// The value of `key` from the first replica that has it: the key's replicas, those on
    /// this host first and then the least loaded (fewest requests in flight from this client;
    /// placement order breaks ties), then every other live member (a block written under an
    /// older membership may sit elsewhere until repair moves it). `None` when no member has
    /// it.
    ///
    /// # Errors
    ///
    /// [`ClusterError::AllReplicasFailed`] only when every member asked failed; a miss on one
    /// and a hit on another is a hit.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ClusterError> {
        self.first_hit(key, |client| client.get(key))
    }

    /// [`get`](Self::get) into `dst`, asking the replicas in the same order; returns the
    /// value's length.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get), and [`ClusterError::BufferTooSmall`] from the first replica
    /// that holds a value larger than `dst` (the others hold the same value: they are not
    /// asked, and the member is not counted as failing).
    pub fn get_into(&self, key: &[u8], dst: &mut [u8]) -> Result<Option<usize>, ClusterError> {
        self.first_hit(key, |client| client.get_into(key, dst))
    }

    /// [`get_into`](Self::get_into) for many keys, each answered as `get_into` would answer
    /// it, in rounds. In each round every key not yet answered is asked of the next member in
    /// its read order, each member getting its keys of the round in one batch
    /// ([`Client::get_into_batch`]), the members at once (a thread each but one). A key its
    /// replicas all missed is looked for on the other members in one round of `exists`, all
    /// members at once, and read from those that hold it. A batch of hits takes one round; a
    /// key no member has takes a round per replica and the `exists` round, not requests of
    /// its own. A member that cannot be reached is not asked again within the batch (it
    /// costs the batch one timeout, not one per key) and counts as failed for every key it
    /// would have been asked for. One result per item, in order.
    pub fn get_into_batch(
        &self,
        items: &mut [(&[u8], &mut [u8])],
    ) -> Vec<Result<Option<usize>, ClusterError>> {
        if items.len() <= 1 {
            return items
                .iter_mut()
                .map(|(key, dst)| self.get_into(key, dst))
                .collect();
        }
        let keys: Vec<&[u8]> = items.iter().map(|(key, _)| *key).collect();
        let mut pending: Vec<Pending> = keys
            .iter()
            .map(|key| {
                let (order, replicas) = self.read_order(key);
                Pending {
                    order,
                    replicas,
                    asked: 0,
                    missed: false,
                    probed: false,
                    failures: Vec::new(),
                    answer: None,
                }
            })
            .collect();
        let mut unreachable: Vec<(u64, ClientError)> = Vec::new();
        loop {
            self.probe_beyond_replicas(&keys, &mut pending, &mut unreachable);
            // Each unanswered item's next member; the members of this round and the items
            // each is asked for, in order.
            let mut members: Vec<(u64, SocketAddr)> = Vec::new();
            let mut places: Vec<Vec<usize>> = Vec::new();
            let mut lane_of: Vec<Option<usize>> = vec![None; items.len()];
            for (place, item) in pending.iter_mut().enumerate() {
                if item.answer.is_some() {
                    continue;
                }
                let Some((id, addr)) = item.next_member(&unreachable) else {
                    item.answer = Some(item.outcome());
                    continue;
                };
                lane_of[place] = Some(add_to_share(&mut members, &mut places, (id, addr), place));
            }
            if members.is_empty() {
                break;
            }
            let mut shares: Vec<Vec<(&[u8], &mut [u8])>> =
                members.iter().map(|_| Vec::new()).collect();
            for ((key, dst), lane) in items.iter_mut().zip(&lane_of) {
                if let Some(lane) = *lane {
                    shares[lane].push((*key, &mut **dst));
                }
            }
            let lanes = shares.iter_mut().map(Vec::as_mut_slice).collect();
            let results = mooncake_kv_transfer::run_in_lanes(lanes, |lane, share| {
                let (id, addr) = members[lane];
                let _in_flight = self.start_request(id);
                match self.client(id, addr) {
                    Ok(client) => client.get_into_batch(share),
                    Err(error) => share.iter().map(|_| Err(error.duplicate())).collect(),
                }
            });
            drop(shares);
            let mut results = results.into_iter();
            for (&(id, addr), places) in members.iter().zip(&places) {
                for (&place, result) in places.iter().zip(results.by_ref()) {
                    let item = &mut pending[place];
                    match result {
                        Ok(Some(len)) => item.answer = Some(Ok(Some(len))),
                        Ok(None) => item.missed = true,
                        // The caller's mistake, not the member's; another replica's answer is
                        // the same.
                        Err(ClientError::BufferTooSmall { needed, available }) => {
                            item.answer =
                                Some(Err(ClusterError::BufferTooSmall { needed, available }));
                        }
                        Err(error) => {
                            note_unreachable(&mut unreachable, id, &error);
                            item.failures.push(self.failed(id, addr, error));
                        }
                    }
                }
            }
        }
        pending
            .into_iter()
            .map(|item| item.answer.unwrap_or(Ok(None)))
            .collect()
    }

    /// For the keys of a batch read whose replicas have all been asked and missed (or failed):
    /// asks every other member in their read orders, all at once, which of them it holds (one
    /// `exists` each), and keeps in each key's order only the members that hold it.
    fn probe_beyond_replicas(
        &self,
        keys: &[&[u8]],
        pending: &mut [Pending],
        unreachable: &mut Vec<(u64, ClientError)>,
    ) {
        let mut members: Vec<(u64, SocketAddr)> = Vec::new();
        let mut asks: Vec<Vec<usize>> = Vec::new();
        for (place, item) in pending.iter_mut().enumerate() {
            if item.answer.is_some() || item.probed || item.asked < item.replicas {
                continue;
            }
            item.probed = true;
            for &(id, addr) in &item.order[item.asked..] {
                if unreachable.iter().any(|(gone, _)| *gone == id) {
                    continue;
                }
                add_to_share(&mut members, &mut asks, (id, addr), place);
            }
        }
        if members.is_empty() {
            return;
        }
        let outcomes = self.each_member(&members, |lane, client| {
            let share: Vec<&[u8]> = asks[lane].iter().map(|&place| keys[place]).collect();
            client.exists(&share)
        });
        for ((id, addr, outcome), asked) in outcomes.into_iter().zip(&asks) {
            match outcome {
                Ok(flags) => {
                    for (&place, held) in asked.iter().zip(flags) {
                        if !held {
                            pending[place].pass_over(id);
                            pending[place].missed = true;
                        }
                    }
                }
                // Unreachable: passed over, and counted, when its turn comes. Any other
                // failure: counted now, and not asked for these keys.
                Err(error) => {
                    if !note_unreachable(unreachable, id, &error) {
                        for &place in asked {
                            pending[place].pass_over(id);
                            pending[place].failures.push(ReplicaFailure {
                                member: id,
                                addr,
                                error: error.duplicate(),
                            });
                        }
                    }
                    let _ = self.failed(id, addr, error);
                }
            }
        }
    }

    /// Which of `keys` some live member holds (a replica, or a copy written under an older
    /// membership among the key's replicas), each in its position.
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoLiveMember`]; [`ClusterError::AllReplicasFailed`] when every member
    /// asked failed.
    pub fn exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>, ClusterError> {
        self.any_share(keys, |client, share| client.exists(share))
    }

    /// Removes `keys` from every replica; says which any replica held.
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoLiveMember`]; [`ClusterError::AllReplicasFailed`] when every member
    /// asked failed.
    pub fn remove(&self, keys: &[&[u8]]) -> Result<Vec<bool>, ClusterError> {
        self.any_share(keys, |client, share| client.remove(share))
    }

    /// Removes every block of every live member; returns how many (each replica counted).
    ///
    /// # Errors
    ///
    /// [`ClusterError::NoLiveMember`]; [`ClusterError::AllReplicasFailed`] when every member
    /// failed.
    pub fn remove_all(&self) -> Result<u64, ClusterError> {
        let members: Vec<(u64, SocketAddr)> = self
            .membership
            .view()
            .into_iter()
            .filter_map(|peer| match (peer.liveness, peer.id) {
                (Liveness::Live, Some(id)) => Some((id, peer.addr)),
                _ => None,
            })
            .collect();
        if members.is_empty() {
            return Err(ClusterError::NoLiveMember);
        }
        let mut removed = 0;
        let mut failures = Vec::new();
        for (id, addr, result) in self.each_member(&members, |_, client| client.remove_all()) {
            match result {
                Ok(n) => removed += n,
                Err(error) => failures.push(self.failed(id, addr, error)),
            }
        }
        if failures.len() == members.len() {
            return Err(ClusterError::AllReplicasFailed(failures));
        }
        Ok(removed)
    }

    /// One flag per key from every member holding a share of `keys`, a key's flag set when
    /// any of its replicas answered true.
    fn any_share(
        &self,
        keys: &[&[u8]],
        call: impl Fn(&Client, &[&[u8]]) -> Result<Vec<bool>, ClientError> + Sync,
    ) -> Result<Vec<bool>, ClusterError> {
        let mut held = vec![false; keys.len()];
        if keys.is_empty() {
            return Ok(held);
        }
        for (share, flags) in self.ask_shares(keys, call)? {
            for (at, flag) in share.into_iter().zip(flags) {
                held[at] |= flag;
            }
        }
        Ok(held)
    }

    /// The members to ask for `key`, in read order (see [`get`](Self::get)): its replicas,
    /// then every other live member; and how many of them are its replicas.
    fn read_order(&self, key: &[u8]) -> (Vec<(u64, SocketAddr)>, usize) {
        let replicas = self.replicas(key);
        let ranked: Vec<(u64, bool, usize)> = replicas
            .iter()
            .map(|&(id, addr)| (id, self.is_local(addr), self.load(id)))
            .collect();
        let mut order: Vec<(u64, SocketAddr)> = read_order(&ranked)
            .into_iter()
            .filter_map(|id| replicas.iter().find(|r| r.0 == id).copied())
            .collect();
        let replicas = order.len();
        for peer in self.membership.view() {
            if let (Liveness::Live, Some(id)) = (peer.liveness, peer.id) {
                if !order.iter().any(|&(o, _)| o == id) {
                    order.push((id, peer.addr));
                }
            }
        }
        (order, replicas)
    }

    /// Asks the members for `key` in read order (see [`get`](Self::get)) until one has it,
    /// one at a time. (Asking the members beyond its replicas at once whether they hold it,
    /// as a batch does, took longer for one key: a thread per member cost about what a
    /// request to it does.)
    fn first_hit<T>(
        &self,
        key: &[u8],
        mut read: impl FnMut(&Client) -> Result<Option<T>, ClientError>,
    ) -> Result<Option<T>, ClusterError> {
        let (order, _) = self.read_order(key);
        if order.is_empty() {
            return Err(ClusterError::NoLiveMember);
        }
        let mut failures = Vec::new();
        let asked = order.len();
        for (id, addr) in order {
            let _in_flight = self.start_request(id);
            match self.client(id, addr).and_then(|c| read(&c)) {
                Ok(Some(value)) => return Ok(Some(value)),
                Ok(None) => {}
                // The caller's mistake, not the member's; another replica's answer is the same.
                Err(ClientError::BufferTooSmall { needed, available }) => {
                    return Err(ClusterError::BufferTooSmall { needed, available });
                }
                Err(error) => failures.push(self.failed(id, addr, error)),
            }
        }
        if failures.len() == asked {
            Err(ClusterError::AllReplicasFailed(failures))
        } else {
            Ok(None)
        }
    }
}

/// Adds position `at` to `member`'s share: `members` and `shares` side by side, the member
/// given a place (with an empty share) if it has none yet. Returns its place.
fn add_to_share(
    members: &mut Vec<(u64, SocketAddr)>,
    shares: &mut Vec<Vec<usize>>,
    member: (u64, SocketAddr),
    at: usize,
) -> usize {
    let place = members
        .iter()
        .position(|m| m.0 == member.0)
        .unwrap_or_else(|| {
            members.push(member);
            shares.push(Vec::new());
            members.len() - 1
        });
    shares[place].push(at);
    place
}

/// One key of a batch read ([`ClusterClient::get_into_batch`]) on its way down its read
/// order.
struct Pending {
    /// The members to ask, in read order (see [`ClusterClient::get`]).
    order: Vec<(u64, SocketAddr)>,
    /// How many at the head of `order` are the key's replicas.
    replicas: usize,
    /// How far down `order` the key has been asked.
    asked: usize,
    /// Whether a member said it does not hold the key.
    missed: bool,
    /// Whether the members beyond its replicas were asked which hold it.
    probed: bool,
    /// The members that failed it, and why.
    failures: Vec<ReplicaFailure>,
    /// Its answer, once there is one.
    answer: Option<Result<Option<usize>, ClusterError>>,
}

impl Pending {
    /// The next member to ask, moving past it, passing over the `unreachable` ones, each
    /// counted as failed with the error it failed with. `None` when none is left.
    fn next_member(&mut self, unreachable: &[(u64, ClientError)]) -> Option<(u64, SocketAddr)> {
        while let Some(&(member, addr)) = self.order.get(self.asked) {
            self.asked += 1;
            match unreachable.iter().find(|(gone, _)| *gone == member) {
                Some((_, error)) => self.failures.push(ReplicaFailure {
                    member,
                    addr,
                    error: error.duplicate(),
                }),
                None => return Some((member, addr)),
            }
        }
        None
    }

    /// Drops `member` from the members still to ask.
    fn pass_over(&mut self, member: u64) {
        let rest = self.order.split_off(self.asked.min(self.order.len()));
        self.order
            .extend(rest.into_iter().filter(|&(id, _)| id != member));
    }

    /// The answer when every member has been asked and none had the key: a miss, unless
    /// every one failed (or there was none).
    fn outcome(&mut self) -> Result<Option<usize>, ClusterError> {
        if self.order.is_empty() {
            Err(ClusterError::NoLiveMember)
        } else if self.missed {
            Ok(None)
        } else {
            Err(ClusterError::AllReplicasFailed(std::mem::take(
                &mut self.failures,
            )))
        }
    }
}

/// Records member `id` as unreachable for the rest of a batch if `error` says the connection
/// failed; returns whether it did.
fn note_unreachable(
    unreachable: &mut Vec<(u64, ClientError)>,
    id: u64,
    error: &ClientError,
) -> bool {
    let io = matches!(error, ClientError::Io { .. });
    if io && !unreachable.iter().any(|(gone, _)| *gone == id) {
        unreachable.push((id, error.duplicate()));
    }
    io
}

#[cfg(test)]
mod tests {
    use super::{ClusterError, Pending, read_order};
    use crate::ClientError;

    #[test]
    fn reads_go_local_first_then_least_loaded_then_in_placement_order() {
        // (id, local, in flight), in placement order.
        assert_eq!(read_order(&[(1, false, 0), (2, true, 5)]), vec![2, 1]);
        assert_eq!(
            read_order(&[(1, false, 3), (2, false, 1), (3, false, 1)]),
            vec![2, 3, 1]
        );
        assert_eq!(
            read_order(&[(1, true, 2), (2, true, 0), (3, false, 0)]),
            vec![2, 1, 3]
        );
        assert_eq!(read_order(&[(7, false, 0), (8, false, 0)]), vec![7, 8]);
        assert!(read_order(&[]).is_empty());
    }

    #[test]
    fn a_batch_passes_over_unreachable_members_counting_each_as_failed() {
        let addr = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let gone = || ClientError::Io {
            action: "reach the node",
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let pending = |members: &[u16]| Pending {
            order: members.iter().map(|&m| (u64::from(m), addr(m))).collect(),
            replicas: 2,
            asked: 0,
            missed: false,
            probed: false,
            failures: Vec::new(),
            answer: None,
        };
        let unreachable = [(2, gone())];
        let mut item = pending(&[1, 2, 3, 4]);
        assert_eq!(item.next_member(&unreachable), Some((1, addr(1))));
        // A member the probe found without the key is never asked.
        item.pass_over(4);
        assert_eq!(item.next_member(&unreachable), Some((3, addr(3))));
        assert_eq!(item.next_member(&unreachable), None);
        assert_eq!(item.next_member(&unreachable), None);
        assert_eq!(item.failures.len(), 1);
        assert_eq!(item.failures[0].member, 2);
        assert!(matches!(
            &item.failures[0].error,
            ClientError::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused
        ));
        // Every member failed: an error, not a miss; one that missed makes it a miss.
        assert!(matches!(item.outcome(), Err(ClusterError::AllReplicasFailed(f)) if f.len() == 1));
        item.missed = true;
        assert!(matches!(item.outcome(), Ok(None)));
        assert!(matches!(
            pending(&[]).outcome(),
            Err(ClusterError::NoLiveMember)
        ));
    }
}
