//! The node: one engine served to peers. A control listener answers [`Request`]s; the
//! engine's DRAM region is registered with the transfer crate and served by its tcp data plane
//! and, for clients on the same host, its shared-memory socket.

mod control;

use control::{accept_loop, sweep_leases};

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_kv_engine::format::Error as FormatError;
use mooncake_kv_engine::{
    ChainEnd, DeviceMemory, Durability, Engine, EngineConfig, PinnedBlock, Reservation,
};
use mooncake_kv_transfer::{RegionHandle, Registry, ShmServer, TcpServer};
use parking_lot::{Condvar, Mutex};

use crate::metrics::Metrics;
use crate::proto::{
    ChainLinks, Descriptor, ErrorCode, ErrorReply, HelloReply, MAX_CACHED_KEYS, NodeStats, Outcome,
    ReadFrameError, Request, ReservedReply, Response, TierFigures, decode_request, encode_body,
    frame_header, read_frame, write_frame,
};
use crate::region::DramRegion;
use crate::repair::{Repair, RepairConfig, RepairStats};

/// How a node is set up. [`NodeConfig::default`] serves on loopback with a DRAM-only engine.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Control-plane address. Default `127.0.0.1:7700`; port 0 picks a free port.
    pub listen: String,
    /// tcp data-plane address. Default `127.0.0.1:7701`.
    pub data_listen: String,
    /// Unix socket of the shared-memory transport; `None` turns it off. Default: none.
    pub shm_path: Option<PathBuf>,
    /// Shared secret every client must present in `Hello`; `None`: none required.
    pub token: Option<Vec<u8>>,
    /// How long a lookup pins a block. Default 2 s.
    pub lease: Duration,
    /// Most leases held at once; beyond, lookups answer without a lease. Default 65,536.
    pub max_leases: usize,
    /// Most control connections at once. Default 1,024.
    pub max_connections: usize,
    /// How long a two-phase put's reservation waits for its commit. Default 10 s.
    pub reservation_timeout: Duration,
    /// Most reservations held at once. Default 4,096.
    pub max_reservations: usize,
    /// A connection that sends nothing (or stops in the middle of a request) for this long,
    /// or does not take a response for this long, is closed: a stalled client never holds a
    /// connection thread or a reservation for good. Clients reconnect on their next request.
    /// Default 5 minutes.
    pub idle_timeout: Duration,
    /// The engine.
    pub engine: EngineConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".to_owned(),
            data_listen: "127.0.0.1:7701".to_owned(),
            shm_path: None,
            token: None,
            lease: Duration::from_secs(2),
            max_leases: 1 << 16,
            max_connections: 1024,
            reservation_timeout: Duration::from_secs(10),
            max_reservations: 4096,
            idle_timeout: Duration::from_secs(300),
            engine: EngineConfig::default(),
        }
    }
}

/// What starting a node can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The engine did not open (bad config, directory in use, ...).
    /// (Its message names the part; the cause is the source, so `{:#}` or an error report
    /// prints each once.)
    #[error("the engine did not open")]
    Engine(#[from] mooncake_kv_engine::Error),
    /// Registering memory or starting a data plane failed.
    #[error("the transfer engine did not start")]
    Transfer(#[from] mooncake_kv_transfer::Error),
    /// A listener or thread could not be started.
    #[error("cannot {action}")]
    Io {
        /// What was being attempted.
        action: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Another live node serves shared memory at this socket path.
    #[error("another live node serves shared memory at {}", .0.display())]
    ShmSocketInUse(PathBuf),
}

fn random_id() -> std::io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty())?;
    Ok(id)
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> NodeError {
    move |source| NodeError::Io { action, source }
}

/// Blocks pinned for remote readers.
#[derive(Default)]
struct Leases {
    by_id: HashMap<u64, PinnedBlock>,
    /// Lease ids in the order they end (every lease has the same length).
    ends: VecDeque<(Instant, u64)>,
    next_id: u64,
}

impl Leases {
    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn grant(&mut self, pinned: PinnedBlock, end: Instant) -> u64 {
        self.next_id += 1;
        self.by_id.insert(self.next_id, pinned);
        self.ends.push_back((end, self.next_id));
        self.next_id
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(end, id)) = self.ends.front() {
            if end > now {
                break;
            }
            self.ends.pop_front();
            self.by_id.remove(&id);
        }
        // Released leases leave their ids in `ends`; keep it from growing past what is held.
        if self.ends.len() > 2 * self.by_id.len() + 1024 {
            let by_id = &self.by_id;
            self.ends.retain(|(_, id)| by_id.contains_key(id));
        }
    }

    fn clear(&mut self) {
        self.by_id.clear();
        self.ends.clear();
    }
}

struct Shared {
    engine: Engine,
    hello: HelloReply,
    handle: RegionHandle,
    token: Option<Vec<u8>>,
    lease: Duration,
    max_leases: usize,
    max_connections: usize,
    leases: Mutex<Leases>,
    /// Two-phase puts waiting for their commit, with their deadline.
    reservations: Mutex<HashMap<u64, (Instant, Reservation)>>,
    next_reservation: AtomicU64,
    reservation_timeout: Duration,
    max_reservations: usize,
    idle_timeout: Duration,
    metrics: Metrics,
    /// Repair's figures, once the node takes part in repair.
    repair_stats: Mutex<Option<Arc<RepairStats>>>,
    /// Blocks with a generation below this (those read back from disk at start, in a
    /// cluster) are not served until repair has reconciled them with the other members; 0:
    /// nothing hidden.
    hidden_below: AtomicU64,
    stopping: AtomicBool,
    /// A clone of each open connection, to stop reading them at shutdown.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
    /// Signalled when the last connection thread ends.
    idle: Condvar,
}

impl Shared {
    fn metrics_text(&self) -> String {
        let leases = self.leases.lock().len() as u64;
        let repair = self.repair_stats.lock().clone();
        self.metrics
            .render(&self.engine.stats(), leases, repair.as_deref())
    }
}

/// Renders a node's metrics; see [`Node::metrics`].
#[derive(Debug, Clone)]
pub struct NodeMetrics(std::sync::Weak<Shared>);

impl NodeMetrics {
    /// The Prometheus text, or `None` once the node has stopped.
    pub fn render(&self) -> Option<String> {
        self.0.upgrade().map(|shared| shared.metrics_text())
    }
}

/// A running node. [`Node::shutdown`] stops it cleanly; dropping it does the same.
pub struct Node {
    shared: Arc<Shared>,
    control_addr: SocketAddr,
    data_addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    sweeper: Option<JoinHandle<()>>,
    registry: Arc<Registry>,
    tcp: Option<TcpServer>,
    shm: Option<ShmServer>,
    repair: Mutex<Option<Repair>>,
}

impl crate::repair::EngineAccess for Shared {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn hidden_below(&self) -> &AtomicU64 {
        &self.hidden_below
    }
}

impl Shared {
    /// Whether a block of `generation` waits for reconciliation (not served yet).
    fn hidden(&self, generation: u64) -> bool {
        let below = self.hidden_below.load(Ordering::Acquire);
        below != 0 && generation < below
    }

    /// Whether `key` has a block this node serves now.
    fn serves(&self, key: &[u8]) -> bool {
        self.engine
            .generation(key)
            .is_some_and(|generation| !self.hidden(generation))
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("control_addr", &self.control_addr)
            .field("data_addr", &self.data_addr)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Opens the engine, registers its DRAM region, and starts the data planes and the
    /// control listener.
    ///
    /// # Errors
    ///
    /// [`NodeError`] naming what could not be set up; nothing keeps running then.
    pub fn start(config: NodeConfig) -> Result<Self, NodeError> {
        let engine = Engine::open(config.engine.clone())?;
        Self::serve(config, engine)
    }

    /// As [`Node::start`], with the HBM tier on `device` instead of the GPU that
    /// `config.engine.hbm` names, as [`Engine::open_with_device`]: for a process that
    /// manages its device itself, or a test on the host test device.
    ///
    /// # Errors
    ///
    /// As [`Node::start`]; a config without `hbm` settings is refused.
    pub fn start_with_device(
        config: NodeConfig,
        device: Arc<dyn DeviceMemory>,
    ) -> Result<Self, NodeError> {
        let engine = Engine::open_with_device(config.engine.clone(), device)?;
        Self::serve(config, engine)
    }

    fn serve(config: NodeConfig, engine: Engine) -> Result<Self, NodeError> {
        let registry = Arc::new(Registry::new()?);
        let handle = registry.register(Arc::new(DramRegion::of(&engine)))?;
        // The control address first: a second node started on a taken address fails here,
        // before it can touch the first one's shared-memory socket.
        let listener =
            TcpListener::bind(config.listen.as_str()).map_err(io("bind the control listener"))?;
        let tcp = TcpServer::bind(config.data_listen.as_str(), Arc::clone(&registry))?;
        let data_addr = tcp.local_addr();
        let shm = match &config.shm_path {
            Some(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(NodeError::ShmSocketInUse(path.clone()));
                }
                // A socket file left by a node that crashed would make bind fail.
                let _ = std::fs::remove_file(path);
                Some(ShmServer::bind(path, Arc::clone(&registry))?)
            }
            None => None,
        };
        let control_addr = listener
            .local_addr()
            .map_err(io("read the control address"))?;
        let hello = HelloReply {
            node_id: match engine.node_id() {
                Some(id) => id,
                // A node without a data directory gets a fresh id each time it starts: it
                // comes back empty, so it is a new member as far as anyone can tell.
                None => random_id().map_err(io("draw a node id"))?,
            },
            data_addr: data_addr.to_string(),
            shm_path: config
                .shm_path
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            region_id: handle.region_id,
            region_len: handle.len,
            remote_key: handle.remote_key,
            lease_ms: u32::try_from(config.lease.as_millis()).unwrap_or(u32::MAX),
        };
        let shared = Arc::new(Shared {
            engine,
            hello,
            handle,
            token: config.token,
            lease: config.lease,
            max_leases: config.max_leases,
            max_connections: config.max_connections,
            leases: Mutex::new(Leases::default()),
            reservations: Mutex::new(HashMap::new()),
            next_reservation: AtomicU64::new(0),
            reservation_timeout: config.reservation_timeout,
            max_reservations: config.max_reservations,
            idle_timeout: config.idle_timeout.max(Duration::from_millis(10)),
            metrics: Metrics::default(),
            repair_stats: Mutex::new(None),
            hidden_below: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            idle: Condvar::new(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("mooncake-node-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(io("start the control acceptor"))?
        };
        let sweeper = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("mooncake-node-leases".into())
                .spawn(move || sweep_leases(&shared))
                .map_err(io("start the lease sweeper"))?
        };
        tracing::info!(%control_addr, %data_addr, shm = ?config.shm_path, "node serving");
        Ok(Self {
            shared,
            control_addr,
            data_addr,
            acceptor: Some(acceptor),
            sweeper: Some(sweeper),
            registry,
            tcp: Some(tcp),
            shm,
            repair: Mutex::new(None),
        })
    }

    /// The control plane's address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The tcp data plane's address.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// This node's id in placement (the first 8 bytes of its node id).
    pub fn member_id(&self) -> u64 {
        crate::membership::member_id(&self.shared.hello.node_id)
    }

    /// Takes part in repair: watches the cluster's members and, whenever the live set
    /// changes, copies each block this node holds to the replicas that should hold it now
    /// and do not (rate limited). Replaces any repair started before.
    ///
    /// A node that read blocks back from its data directory at start does not serve them
    /// until repair has reconciled them with the live members: a block another member holds
    /// was written (or kept) while this node was away, so that copy replaces (or, if this
    /// node is no longer one of its replicas, drops) the one read from disk. A block nobody
    /// else holds is kept. A block removed while the node was away comes back this way:
    /// there are no tombstones (KVCache keys name their content, so a key is rarely
    /// rewritten with other bytes, but a removal can be undone).
    ///
    /// # Errors
    ///
    /// If the repair threads cannot be started.
    pub fn start_repair(&self, mut config: RepairConfig) -> Result<(), NodeError> {
        let first_new = self.shared.engine.first_new_generation();
        if first_new > 1 && self.repair.lock().is_none() {
            self.shared.hidden_below.store(first_new, Ordering::Release);
        }
        if let crate::membership::MembershipConfig::Etcd(etcd) = &mut config.membership {
            etcd.register = Some(crate::membership::Registration {
                id: self.member_id(),
                addr: self.control_addr,
            });
        }
        let engine: Arc<crate::repair::EngineHandle> = self.shared.clone();
        let repair = Repair::start(engine, self.member_id(), config).map_err(io("start repair"))?;
        *self.shared.repair_stats.lock() = Some(Arc::clone(repair.stats_shared()));
        *self.repair.lock() = Some(repair);
        Ok(())
    }

    /// Repair's figures, if the node takes part in repair.
    pub fn repair_stats(&self) -> Option<Arc<RepairStats>> {
        self.shared.repair_stats.lock().clone()
    }

    /// The engine this node serves.
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// The node's figures in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// A handle that renders the node's figures from another thread (an HTTP endpoint). It
    /// does not keep the node alive: once the node is shut down it renders nothing.
    pub fn metrics(&self) -> NodeMetrics {
        NodeMetrics(Arc::downgrade(&self.shared))
    }

    /// Stops accepting connections, lets each open connection finish the request it is
    /// serving (no new ones are read), waits up to `grace` for them, releases every lease,
    /// stops the data planes, flushes the engine (every block held becomes durable when there
    /// is a data directory) and closes it.
    ///
    /// # Errors
    ///
    /// The flush's.
    pub fn shutdown(mut self, grace: Duration) -> Result<usize, mooncake_kv_engine::Error> {
        self.stop(grace);
        let flushed = if self.shared.engine.config().data_dir.is_some() {
            self.shared.engine.flush()?
        } else {
            0
        };
        tracing::info!(flushed, "node stopped");
        Ok(flushed)
    }

    fn stop(&mut self, grace: Duration) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        drop(self.repair.lock().take());
        let _ = TcpStream::connect_timeout(&self.control_addr, Duration::from_secs(1));
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
        // Stop reading requests; a thread in the middle of one still writes its response.
        for stream in self.shared.connections.lock().values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + grace;
        let mut connections = self.shared.connections.lock();
        while !connections.is_empty() {
            if self
                .shared
                .idle
                .wait_until(&mut connections, deadline)
                .timed_out()
            {
                tracing::warn!(
                    open = connections.len(),
                    "connections still open after the grace period; closing them"
                );
                for stream in connections.values() {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                break;
            }
        }
        drop(connections);
        if let Some(handle) = self.sweeper.take() {
            let _ = handle.join();
        }
        self.shared.leases.lock().clear();
        self.shared.reservations.lock().clear();
        self.registry.unregister(self.shared.handle.region_id);
        self.shm = None;
        self.tcp = None;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}
