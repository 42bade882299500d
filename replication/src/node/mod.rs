//! The node: one engine served to peers. A control listener answers [`Request`]s; the
//! engine's DRAM region is registered with the transfer crate and served by its tcp data plane
//! and, for clients on the same host, its shared-memory socket.

mod control;
mod workers;

use control::{accept_loop, sweep_leases};
use workers::{Workers, poll_parked};

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
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
    AdmissionFigures, ChainLinks, Descriptor, ErrorCode, ErrorReply, FRAME_HEADER_BYTES,
    FrameHeader, HelloReply, MAX_BODY_BYTES, MAX_CACHED_KEYS, MAX_HELLO_BODY_BYTES, NodeStats,
    Outcome, ReadFrameError, Request, ReservedReply, Response, TierFigures, decode_request,
    encode_body, frame_header, read_frame_within, write_frame,
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
    /// Most authenticated control connections at once; a `Hello` beyond is refused with
    /// `Busy`. Default 1,024.
    pub max_connections: usize,
    /// Most control connections at once that have not authenticated yet; beyond, the oldest
    /// of them is closed to make room for the new one. They never take the place of
    /// authenticated ones, and a flood of them delays a client that says Hello by no more
    /// than its own round trip. Default 256.
    pub max_unauthenticated: usize,
    /// How long a new connection has to authenticate (`Hello`, with the token when there is
    /// one) before it is closed, however it trickles its bytes. Default 5 s.
    pub hello_timeout: Duration,
    /// How long a two-phase put's reservation waits for its commit. Default 10 s.
    pub reservation_timeout: Duration,
    /// Most reservations held at once. Default 4,096.
    pub max_reservations: usize,
    /// Most bytes the reservations made on one connection may hold at once; `None`: a
    /// quarter of the DRAM tier. So one client cannot hold the whole tier in reservations
    /// and make every other put fail for the reservation timeout, again and again.
    pub max_reserved_bytes_per_connection: Option<u64>,
    /// A connection that sends nothing (or stops in the middle of a request) for this long,
    /// or does not take a response for this long, is closed: a stalled client never holds a
    /// connection thread or a reservation for good. Clients reconnect on their next request.
    /// Default 5 minutes.
    pub idle_timeout: Duration,
    /// Event loops serving the control plane's quick requests (lookups and their inline
    /// blocks, exists, prefix matches); 0: one per two cores, at least one, which leaves the
    /// other cores to the workers (puts), the data planes, the engine and, on a machine that
    /// also runs the inference engine's processes, to them. Default 0.
    pub event_loops: usize,
    /// How long a worker that holds a lone client's connection between requests (see
    /// `workers.rs`) polls it for the next one before it sleeps, while the client's requests
    /// come within twice this of each other. A request that comes within it is served with
    /// no wake-up; on a host with few cores, sleeping between one large get and the next also
    /// lets the scheduler put the client and the node's thread on one core, where they take
    /// turns (docs/node.md has the one-stream figures). The polling yields the core to any
    /// thread waiting for it between looks, so it takes only a core nothing else wants; a
    /// client that pauses longer costs this much of such a core once per pause. Zero: sleep
    /// at once. Default 200 us.
    pub poll_before_sleep: Duration,
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
            max_unauthenticated: 256,
            hello_timeout: Duration::from_secs(5),
            reservation_timeout: Duration::from_secs(10),
            max_reservations: 4096,
            max_reserved_bytes_per_connection: None,
            idle_timeout: Duration::from_secs(300),
            event_loops: 0,
            poll_before_sleep: Duration::from_micros(200),
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

/// A control connection being served.
struct Connection {
    /// The socket's descriptor, to stop it from another thread. Not a clone: a connection
    /// takes one descriptor, not two. It stays valid while the entry exists, because
    /// whoever closes the socket (drops the [`workers::Job`] that owns it) forgets the entry
    /// first, under the same lock that every use of `fd` holds.
    fd: RawFd,
    authenticated: bool,
    /// When it must have authenticated; `None` once it has, or once it was closed for not
    /// having done so.
    hello_deadline: Option<Instant>,
}

/// The open control connections.
#[derive(Default)]
struct Connections {
    open: HashMap<u64, Connection>,
    /// How many of `open` have not authenticated.
    unauthenticated: usize,
}

impl Connection {
    #[expect(
        unsafe_code,
        reason = "a descriptor owned by a Job, borrowed by number"
    )]
    fn shutdown(&self, how: rustix::net::Shutdown) {
        // SAFETY: `fd` is the socket of a live `Job`: this entry is in `Connections`, which
        // is locked by the caller (`&self` is only reachable through the lock), and every
        // path that drops a Job (`Shared::forget`, the poller's closes, which also forget)
        // removes its entry under that lock first. So the number is not yet closed, nor
        // reused by another file.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = rustix::net::shutdown(fd, how);
    }
}

impl Connections {
    /// Connections that have authenticated.
    fn authenticated(&self) -> usize {
        self.open.len() - self.unauthenticated
    }

    /// Closes the connection that has waited longest to authenticate (and forgets it: its
    /// thread sees the close and ends); `false` if none waits.
    fn close_oldest_unauthenticated(&mut self) -> bool {
        let oldest = self
            .open
            .iter()
            .filter(|(_, c)| !c.authenticated)
            .min_by_key(|&(&id, _)| id)
            .map(|(&id, _)| id);
        let Some(connection) = oldest.and_then(|id| self.open.remove(&id)) else {
            return false;
        };
        connection.shutdown(rustix::net::Shutdown::Both);
        self.unauthenticated -= 1;
        true
    }

    /// Shuts down the connections whose time to authenticate is over; returns how many.
    fn close_late(&mut self, now: Instant) -> u64 {
        let mut closed = 0;
        for connection in self.open.values_mut() {
            if connection
                .hello_deadline
                .is_some_and(|deadline| deadline <= now)
            {
                connection.shutdown(rustix::net::Shutdown::Both);
                // Counted once; the serving thread removes it when it sees the close.
                connection.hello_deadline = None;
                closed += 1;
            }
        }
        closed
    }
}

/// A two-phase put waiting for its commit.
struct Reserved {
    deadline: Instant,
    reservation: Reservation,
    /// The connection that made it.
    connection: u64,
}

struct Shared {
    engine: Engine,
    hello: HelloReply,
    handle: RegionHandle,
    token: Option<Vec<u8>>,
    lease: Duration,
    max_leases: usize,
    max_connections: usize,
    max_unauthenticated: usize,
    hello_timeout: Duration,
    leases: Mutex<Leases>,
    /// Two-phase puts waiting for their commit, with their deadline.
    reservations: Mutex<HashMap<u64, Reserved>>,
    /// See [`NodeConfig::max_reserved_bytes_per_connection`].
    reserved_bytes_per_connection: u64,
    next_reservation: AtomicU64,
    reservation_timeout: Duration,
    max_reservations: usize,
    idle_timeout: Duration,
    poll_before_sleep: Duration,
    metrics: Metrics,
    /// Repair's figures, once the node takes part in repair.
    repair_stats: Mutex<Option<Arc<RepairStats>>>,
    /// Blocks with a generation below this (those read back from disk at start, in a
    /// cluster) are not served until repair has reconciled them with the other members; 0:
    /// nothing hidden.
    hidden_below: AtomicU64,
    stopping: AtomicBool,
    /// Each open connection, to close late ones and stop reading them all at shutdown.
    connections: Mutex<Connections>,
    next_connection: AtomicU64,
    /// Signalled when the last connection ends.
    idle: Condvar,
    /// The threads that serve connections, and the poller that holds the quiet ones.
    workers: Workers,
}

impl Shared {
    fn metrics_text(&self) -> String {
        let leases = self.leases.lock().len() as u64;
        let repair = self.repair_stats.lock().clone();
        let (authenticated, unauthenticated) = self.connection_counts();
        self.metrics.render(
            &self.engine.stats(),
            leases,
            &crate::metrics::ConnectionFigures {
                authenticated,
                unauthenticated,
                parked: self.workers.parked() as u64,
                workers: self.workers.threads() as u64,
            },
            repair.as_deref(),
        )
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
    /// The control plane's event loops, one per core.
    pollers: Vec<JoinHandle<()>>,
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
            max_unauthenticated: config.max_unauthenticated.max(1),
            hello_timeout: config.hello_timeout,
            leases: Mutex::new(Leases::default()),
            reservations: Mutex::new(HashMap::new()),
            next_reservation: AtomicU64::new(0),
            reservation_timeout: config.reservation_timeout,
            max_reservations: config.max_reservations,
            reserved_bytes_per_connection: config
                .max_reserved_bytes_per_connection
                .unwrap_or(config.engine.dram_capacity_bytes / 4),
            idle_timeout: config.idle_timeout.max(Duration::from_millis(10)),
            poll_before_sleep: config.poll_before_sleep,
            metrics: Metrics::default(),
            repair_stats: Mutex::new(None),
            hidden_below: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(Connections::default()),
            next_connection: AtomicU64::new(0),
            idle: Condvar::new(),
            workers: Workers::new(
                config.max_connections + config.max_unauthenticated,
                config.event_loops,
            )
            .map_err(io("create the control plane's poller"))?,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("mooncake-node-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(io("start the control acceptor"))?
        };
        let pollers = (0..shared.workers.loops())
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("mooncake-node-loop-{index}"))
                    .spawn(move || poll_parked(&shared, index))
                    .map_err(io("start a control-plane event loop"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
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
            pollers,
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
        // The event loops close the parked connections as they end.
        for handle in self.pollers.drain(..) {
            let _ = handle.join();
        }
        // Stop reading requests; a worker in the middle of one still writes its response.
        for connection in self.shared.connections.lock().open.values() {
            connection.shutdown(rustix::net::Shutdown::Read);
        }
        let deadline = Instant::now() + grace;
        let mut connections = self.shared.connections.lock();
        while !connections.open.is_empty() {
            if self
                .shared
                .idle
                .wait_until(&mut connections, deadline)
                .timed_out()
            {
                tracing::warn!(
                    open = connections.open.len(),
                    "connections still open after the grace period; closing them"
                );
                for connection in connections.open.values() {
                    connection.shutdown(rustix::net::Shutdown::Both);
                }
                break;
            }
        }
        drop(connections);
        // Workers hold the node's state: they end, and their threads with them, before the
        // engine can be closed.
        let ended = self
            .shared
            .workers
            .wait_ended(deadline + Duration::from_secs(1));
        if !ended {
            tracing::warn!("worker threads still running after the grace period");
        }
        self.shared.workers.join(ended);
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
