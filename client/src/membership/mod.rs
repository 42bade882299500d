//! Who is live, behind one small seam ([`Membership`]) with two backends:
//!
//! - static ([`StaticMembership`], the embedded default): a fixed list of peers (from config);
//!   a background thread says hello to each at every heartbeat and asks whether it serves. A
//!   peer not heard from for `suspect_after` is suspected, for `dead_after` dead; a dead peer
//!   that answers again rejoins, with a fresh join time, so that placement ramps its weight up
//!   again.
//! - etcd ([`EtcdMembership`]): each node keeps its registration under a key prefix alive with
//!   an etcd lease; nodes and clients watch the prefix.

#[cfg(feature = "etcd")]
mod etcd;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdMembership, Registration};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::placement::{JOIN_RAMP, Member};
use crate::{Client, ClientConfig};

/// Who is live, as one backend sees it.
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// Every member known, and how it looks now.
    fn view(&self) -> Vec<PeerView>;

    /// How often the view is worth looking at again (a heartbeat, or a fraction of a lease).
    fn period(&self) -> Duration;

    /// How long a member that (re)joined takes to reach its full placement weight.
    fn join_ramp(&self) -> Duration {
        JOIN_RAMP
    }

    /// The live members, weighted for placement (a recent joiner ramps up over
    /// [`join_ramp`](Self::join_ramp)).
    fn live_members(&self) -> Vec<Member> {
        let now = Instant::now();
        let ramp = self.join_ramp();
        self.view()
            .into_iter()
            .filter(|p| p.liveness == Liveness::Live)
            .filter_map(|p| {
                let id = p.id?;
                let since = now.saturating_duration_since(p.joined.unwrap_or(now));
                Some(Member::joining(id, since, ramp))
            })
            .collect()
    }
}

/// Which backend, and its settings.
#[derive(Debug, Clone)]
pub enum MembershipConfig {
    /// A fixed list of peers with heartbeats.
    Static(StaticConfig),
    /// Registrations under an etcd prefix, kept alive by leases (feature `etcd`).
    #[cfg(feature = "etcd")]
    Etcd(EtcdConfig),
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self::Static(StaticConfig::default())
    }
}

impl From<StaticConfig> for MembershipConfig {
    fn from(config: StaticConfig) -> Self {
        Self::Static(config)
    }
}

#[cfg(feature = "etcd")]
impl From<EtcdConfig> for MembershipConfig {
    fn from(config: EtcdConfig) -> Self {
        Self::Etcd(config)
    }
}

impl MembershipConfig {
    /// Starts the backend.
    ///
    /// # Errors
    ///
    /// If its thread cannot be started, or (etcd) its config cannot work.
    pub fn start(&self) -> std::io::Result<Box<dyn Membership>> {
        Ok(match self {
            Self::Static(config) => Box::new(StaticMembership::start(config.clone())?),
            #[cfg(feature = "etcd")]
            Self::Etcd(config) => Box::new(EtcdMembership::start(config.clone())?),
        })
    }
}

/// How a member looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Answered within `suspect_after`.
    Live,
    /// Silent for longer than `suspect_after`, not yet `dead_after`.
    Suspect,
    /// Silent for `dead_after` or more, or never heard from.
    Dead,
}

/// Settings of the static backend.
#[derive(Debug, Clone)]
pub struct StaticConfig {
    /// The peers' control addresses (this node's own included, if it is one).
    pub peers: Vec<SocketAddr>,
    /// Time between heartbeats. Default 500 ms.
    pub heartbeat: Duration,
    /// Silence after which a peer is suspected. Default 1.5 s.
    pub suspect_after: Duration,
    /// Silence after which a peer is dead. Default 5 s.
    pub dead_after: Duration,
    /// The shared secret of the peers, if they have one.
    pub token: Option<Vec<u8>>,
    /// How long a (re)joining peer takes to reach its full placement weight. Default
    /// [`JOIN_RAMP`] (60 s).
    pub join_ramp: Duration,
}

impl Default for StaticConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            heartbeat: Duration::from_millis(500),
            suspect_after: Duration::from_millis(1500),
            dead_after: Duration::from_secs(5),
            token: None,
            join_ramp: JOIN_RAMP,
        }
    }
}

/// One peer, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// Its control address.
    pub addr: SocketAddr,
    /// Its id (the first 8 bytes of its node id), once it has answered.
    pub id: Option<u64>,
    /// Live, suspect or dead.
    pub liveness: Liveness,
    /// When it last answered.
    pub last_seen: Option<Instant>,
    /// When it last became live after being dead (or first answered).
    pub joined: Option<Instant>,
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    id: Option<u64>,
    last_seen: Option<Instant>,
    joined: Option<Instant>,
}

/// The static membership backend; dropping it stops the heartbeats.
#[derive(Debug)]
pub struct StaticMembership {
    config: StaticConfig,
    peers: Arc<Mutex<Vec<Peer>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticMembership {
    /// Starts heartbeating `config.peers`.
    ///
    /// # Errors
    ///
    /// If the heartbeat thread cannot be started.
    pub fn start(config: StaticConfig) -> std::io::Result<Self> {
        let peers = Arc::new(Mutex::new(
            config
                .peers
                .iter()
                .map(|&addr| Peer {
                    addr,
                    id: None,
                    last_seen: None,
                    joined: None,
                })
                .collect(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peers, stop, config) = (Arc::clone(&peers), Arc::clone(&stop), config.clone());
            std::thread::Builder::new()
                .name("mooncake-heartbeat".into())
                .spawn(move || heartbeat_loop(&config, &peers, &stop))?
        };
        Ok(Self {
            config,
            peers,
            stop,
            thread: Some(thread),
        })
    }
}

impl Membership for StaticMembership {
    /// Every peer and how it looks now.
    fn view(&self) -> Vec<PeerView> {
        let now = Instant::now();
        self.peers
            .lock()
            .iter()
            .map(|p| PeerView {
                addr: p.addr,
                id: p.id,
                liveness: liveness(&self.config, p.last_seen, now),
                last_seen: p.last_seen,
                joined: p.joined,
            })
            .collect()
    }

    fn period(&self) -> Duration {
        self.config.heartbeat
    }

    fn join_ramp(&self) -> Duration {
        self.config.join_ramp
    }
}

impl Drop for StaticMembership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A member's id in placement: the first 8 bytes of its node id (as a node says in its Hello
/// reply), little-endian.
pub fn member_id(node_id: &[u8; 16]) -> u64 {
    mooncake_kv_format::le::u64_at(node_id, 0)
}

fn liveness(config: &StaticConfig, last_seen: Option<Instant>, now: Instant) -> Liveness {
    match last_seen.map(|t| now.saturating_duration_since(t)) {
        Some(silence) if silence < config.suspect_after => Liveness::Live,
        Some(silence) if silence < config.dead_after => Liveness::Suspect,
        _ => Liveness::Dead,
    }
}

fn heartbeat_loop(config: &StaticConfig, peers: &Mutex<Vec<Peer>>, stop: &AtomicBool) {
    let client_config = ClientConfig {
        token: config.token.clone(),
        timeout: config.heartbeat.max(Duration::from_millis(100)),
        connections: 1,
        transport: crate::TransportChoice::Tcp,
        ..ClientConfig::default()
    };
    let mut clients: Vec<Option<Client>> = config.peers.iter().map(|_| None).collect();
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        for (i, &addr) in config.peers.iter().enumerate() {
            // Reuse the connection while the peer answers; reconnect after a failure.
            let answered = match &clients[i] {
                Some(client) => client.health().unwrap_or(false),
                None => false,
            };
            let answered = answered || {
                clients[i] = Client::connect(addr, client_config.clone()).ok();
                clients[i]
                    .as_ref()
                    .is_some_and(|c| c.health().unwrap_or(false))
            };
            if !answered {
                clients[i] = None;
                continue;
            }
            let now = Instant::now();
            let id = clients[i].as_ref().map(|c| member_id(&c.hello().node_id));
            let mut peers = peers.lock();
            let peer = &mut peers[i];
            let was = liveness(config, peer.last_seen, now);
            // A new id at the same address is a node that restarted empty: it rejoins.
            if was == Liveness::Dead || peer.id != id {
                peer.joined = Some(now);
            }
            peer.id = id;
            peer.last_seen = Some(now);
        }
        let pause = config.heartbeat.saturating_sub(started.elapsed());
        let deadline = Instant::now() + pause;
        while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10).min(pause));
        }
    }
}
