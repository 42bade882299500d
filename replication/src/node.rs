//! The node: one engine served to peers. A control listener answers [`Request`]s; the
//! engine's DRAM region is registered with the transfer crate and served by its tcp data plane
//! and, for clients on the same host, its shared-memory socket.

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

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        {
            let mut connections = shared.connections.lock();
            if connections.len() >= shared.max_connections {
                tracing::warn!("too many control connections; refusing one");
                continue;
            }
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            connections.insert(id, clone);
        }
        shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("mooncake-node-serve".into())
            .spawn(move || {
                if let Err(error) = serve(stream, &shared) {
                    tracing::debug!(%error, "control connection closed");
                }
                shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
                let mut connections = shared.connections.lock();
                connections.remove(&id);
                if connections.is_empty() {
                    shared.idle.notify_all();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start a thread for a connection");
        }
    }
}

fn sweep_leases(shared: &Shared) {
    while !shared.stopping.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        shared.leases.lock().expire(now);
        // Dropping a reservation returns its space to the engine.
        shared
            .reservations
            .lock()
            .retain(|_, (deadline, _)| *deadline > now);
    }
}

/// Serves one connection until it closes, sends a frame that fails its checks, or fails
/// authentication.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    // Socket options: they hold for the reader's clone too.
    stream.set_read_timeout(Some(shared.idle_timeout))?;
    stream.set_write_timeout(Some(shared.idle_timeout))?;
    // Small read-ahead: put values that follow a frame are read straight into the space
    // reserved for them; at most this much of one is copied out of the buffer.
    let mut reader = BufReader::with_capacity(4096, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(64 << 10, &stream);
    let mut body = Vec::new();
    let mut authenticated = false;
    loop {
        let header = match read_frame(&mut reader, &mut body) {
            Ok(Some(header)) => header,
            Ok(None) => return Ok(()),
            Err(ReadFrameError::Io(e)) => return Err(e),
            Err(ReadFrameError::Frame(error)) => {
                // The stream is out of step: say why, then close.
                shared
                    .metrics
                    .rejected_frames
                    .fetch_add(1, Ordering::Relaxed);
                let reply = refuse(ErrorCode::BadRequest, format!("bad frame: {error}"));
                write_frame(&mut writer, 0, &encode_body(&reply))?;
                return writer.flush();
            }
        };
        let (response, close) = match decode_request(&body) {
            Err(error) => {
                shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
                (refuse(ErrorCode::BadRequest, error.to_string()), false)
            }
            Ok(Request::Hello { token }) => {
                if token_ok(shared.token.as_deref(), token) {
                    authenticated = true;
                    (Response::Hello(shared.hello.clone()), false)
                } else {
                    shared.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
                    (
                        refuse(ErrorCode::Unauthorized, "missing or wrong token".to_owned()),
                        true,
                    )
                }
            }
            Ok(_) if !authenticated => (
                refuse(
                    ErrorCode::Unauthorized,
                    "send Hello (with the token, if the node has one) first".to_owned(),
                ),
                true,
            ),
            Ok(Request::Put {
                items,
                durable,
                chain,
            }) => {
                match put_from_stream(shared, &mut reader, &items, durable, chain)? {
                    Ok(response) => (response, false),
                    // The values cannot be skipped sensibly: answer, then close.
                    Err(refusal) => (refusal, true),
                }
            }
            Ok(request) => {
                let (response, inline) = handle(shared, request);
                let body = encode_body(&response);
                if inline.is_empty() {
                    write_frame(&mut writer, header.request_id, &body)?;
                    writer.flush()?;
                } else {
                    writer.flush()?;
                    write_with_blocks(&stream, header.request_id, &body, &inline)?;
                }
                continue;
            }
        };
        write_frame(&mut writer, header.request_id, &encode_body(&response))?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Writes a frame and the inline blocks that follow it, straight from the pinned DRAM copies,
/// in as few system calls as the socket takes (usually one, so the reader is woken once).
fn write_with_blocks(
    mut stream: &TcpStream,
    request_id: u64,
    body: &[u8],
    blocks: &[PinnedBlock],
) -> std::io::Result<()> {
    /// Well under every system's IOV_MAX.
    const MAX_SLICES: usize = 512;
    let header = frame_header(request_id, body)?;
    let mut slices = Vec::with_capacity(2 + blocks.len());
    slices.extend([IoSlice::new(&header), IoSlice::new(body)]);
    slices.extend(blocks.iter().map(|b| IoSlice::new(b.block_bytes())));
    let mut pending = &mut slices[..];
    while !pending.is_empty() {
        let at_most = pending.len().min(MAX_SLICES);
        let written = match stream.write_vectored(&pending[..at_most]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            result => result?,
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut pending, written);
    }
    Ok(())
}

/// Serves a put whose values follow the frame: each value is received straight into the DRAM
/// space reserved for its block, then sealed and published. A value the engine refuses is
/// read and dropped, so the stream stays in step. `Ok(Err(_))` when the lengths are beyond
/// the limits (the connection is then closed); `Err` when the stream fails.
fn put_from_stream(
    shared: &Shared,
    reader: &mut impl Read,
    items: &[(&[u8], u32)],
    durable: bool,
    chain: Option<ChainLinks<'_>>,
) -> std::io::Result<Result<Response, Response>> {
    let started = Instant::now();
    let metrics = &shared.metrics;
    if let Some(&(_, len)) = items
        .iter()
        .find(|(_, len)| *len as usize > mooncake_kv_engine::MAX_VALUE_BYTES)
    {
        metrics.errors.fetch_add(1, Ordering::Relaxed);
        return Ok(Err(refuse(
            ErrorCode::TooLarge,
            format!(
                "value of {len} bytes exceeds the limit of {}",
                mooncake_kv_engine::MAX_VALUE_BYTES
            ),
        )));
    }
    let durability = if durable {
        Durability::WriteThrough
    } else {
        Durability::Memory
    };
    // A chain's blocks are linked as they are committed; a plain batch's are not.
    let mut linked = chain.map(|c| shared.engine.chain(c.parent));
    let partial_end = chain.is_some_and(|c| c.partial_end);
    let mut outcomes = Vec::with_capacity(items.len());
    for (index, &(key, len)) in items.iter().enumerate() {
        metrics.bytes_in.fetch_add(len.into(), Ordering::Relaxed);
        let end = if partial_end && index + 1 == items.len() {
            ChainEnd::Partial
        } else {
            ChainEnd::Full
        };
        let reserved = match linked.as_mut() {
            Some(linked) => linked.reserve(key, len as usize),
            None => shared.engine.reserve(key, len as usize),
        };
        let outcome = match reserved {
            Ok(mut reservation) => {
                // The only copy: from the socket into the block's place in DRAM.
                reader.read_exact(reservation.payload_mut())?;
                let committed = match linked.as_mut() {
                    Some(linked) => linked.commit(reservation, durability, end),
                    None => shared.engine.commit(reservation, durability),
                };
                match committed {
                    Ok(generation) => Outcome::Ok(generation),
                    Err(error) => Outcome::Err(engine_refusal(&error)),
                }
            }
            Err(error) => {
                std::io::copy(&mut reader.take(len.into()), &mut std::io::sink())?;
                Outcome::Err(engine_refusal(&error))
            }
        };
        if matches!(outcome, Outcome::Err(_)) {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcomes.push(outcome);
    }
    metrics.record(0, started.elapsed());
    Ok(Ok(Response::Put(outcomes)))
}

/// Compares in time independent of where the first difference is.
fn token_ok(expected: Option<&[u8]>, given: &[u8]) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    if expected.len() != given.len() {
        return false;
    }
    expected
        .iter()
        .zip(given)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn refuse(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

fn engine_refusal(error: &mooncake_kv_engine::Error) -> ErrorReply {
    use mooncake_kv_engine::Error as E;
    let code = match error {
        E::Format(FormatError::KeyTooLong { .. } | FormatError::ValueTooLarge { .. }) => {
            ErrorCode::TooLarge
        }
        E::Format(FormatError::EmptyKey) | E::NotPersistent => ErrorCode::BadRequest,
        E::NoSpace { .. } => ErrorCode::NoSpace,
        _ => ErrorCode::Internal,
    };
    ErrorReply {
        code,
        message: error.to_string(),
    }
}

/// Serves one request; returns the response and the blocks to send after it (inline lookups).
fn handle(shared: &Shared, request: Request<'_>) -> (Response, Vec<PinnedBlock>) {
    let started = Instant::now();
    let engine = &shared.engine;
    let metrics = &shared.metrics;
    let count_errors = |n: usize| {
        if n > 0 {
            metrics.errors.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let mut inline_blocks = Vec::new();
    let (kind, response) = match request {
        Request::Hello { .. } => (
            0,
            Response::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                message: "Hello is only the first request".to_owned(),
            }),
        ),
        Request::Put { .. } => (
            0,
            Response::Error(ErrorReply {
                code: ErrorCode::Internal,
                message: "a put is served with its values".to_owned(),
            }),
        ),
        Request::Reserve { key, len } => (7, reserve(shared, key, len)),
        Request::Commit {
            reservation,
            payload,
            durable,
        } => {
            let outcome = commit(shared, reservation, payload, durable);
            count_errors(usize::from(matches!(outcome, Outcome::Err(_))));
            (8, Response::Put(vec![outcome]))
        }
        Request::Abort { reservation } => {
            let existed = shared.reservations.lock().remove(&reservation).is_some();
            (8, Response::Flags(vec![existed]))
        }
        Request::Lookup {
            keys,
            release,
            stale_reads,
            cached_reads,
            cached_keys,
            inline,
        } => {
            // Reads the node did not serve still count as uses (at most MAX_CACHED_KEYS are
            // taken from one request; a client that names more is not trusted with them).
            shared
                .engine
                .touch(&cached_keys[..cached_keys.len().min(MAX_CACHED_KEYS)]);
            shared
                .metrics
                .stale_reads
                .fetch_add(u64::from(stale_reads), Ordering::Relaxed);
            shared
                .metrics
                .cached_reads
                .fetch_add(u64::from(cached_reads), Ordering::Relaxed);
            {
                let mut leases = shared.leases.lock();
                for id in release {
                    leases.by_id.remove(&id);
                }
            }
            let outcomes: Vec<_> = keys
                .iter()
                .map(|key| lookup(shared, key, inline.then_some(&mut inline_blocks)))
                .collect();
            count_errors(
                outcomes
                    .iter()
                    .filter(|o| matches!(o, Outcome::Err(_)))
                    .count(),
            );
            (1, Response::Lookup(outcomes))
        }
        Request::Exists { keys } => (
            2,
            Response::Flags(keys.iter().map(|key| shared.serves(key)).collect()),
        ),
        Request::PrefixMatch { keys } => {
            let count = if shared.hidden_below.load(Ordering::Acquire) == 0 {
                engine.prefix_match(&keys)
            } else {
                keys.iter().take_while(|key| shared.serves(key)).count()
            };
            (3, Response::Count(count as u64))
        }
        Request::Remove { keys } => (4, Response::Flags(engine.remove_batch(&keys))),
        Request::Stats => (5, Response::Stats(node_stats(shared))),
        Request::Health => (
            6,
            Response::Health {
                serving: !shared.stopping.load(Ordering::Acquire),
            },
        ),
        Request::EndChain { keys } => (9, Response::Flags(vec![engine.end_chain(&keys)])),
    };
    metrics.record(kind, started.elapsed());
    (response, inline_blocks)
}

/// Pins the block of `key` and describes it; with `inline`, hands the pin over to be sent
/// after the response, else keeps it as a lease.
fn lookup(
    shared: &Shared,
    key: &[u8],
    inline: Option<&mut Vec<PinnedBlock>>,
) -> Outcome<Option<Descriptor>> {
    let pinned = match shared.engine.pin(key) {
        Ok(Some(pinned)) if !shared.hidden(pinned.generation()) => pinned,
        Ok(_) => return Outcome::Ok(None),
        Err(error) => return Outcome::Err(engine_refusal(&error)),
    };
    let mut descriptor = Descriptor {
        region_id: shared.handle.region_id,
        remote_key: shared.handle.remote_key,
        offset: pinned.block_offset(),
        block_len: pinned.block_len(),
        payload_offset: pinned.payload_offset(),
        payload_len: u32::try_from(pinned.payload().len()).unwrap_or(u32::MAX),
        generation: pinned.generation(),
        lease_ms: 0,
        lease_id: 0,
    };
    shared
        .metrics
        .bytes_described
        .fetch_add(descriptor.block_len, Ordering::Relaxed);
    if let Some(inline) = inline {
        inline.push(pinned);
        return Outcome::Ok(Some(descriptor));
    }
    let mut leases = shared.leases.lock();
    if leases.len() < shared.max_leases {
        descriptor.lease_ms = shared.hello.lease_ms;
        descriptor.lease_id = leases.grant(pinned, Instant::now() + shared.lease);
    }
    Outcome::Ok(Some(descriptor))
}

fn reserve(shared: &Shared, key: &[u8], len: u32) -> Response {
    let mut reservations = shared.reservations.lock();
    if reservations.len() >= shared.max_reservations {
        shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return refuse(
            ErrorCode::NoSpace,
            format!("{} reservations are open already", reservations.len()),
        );
    }
    let reservation = match shared.engine.reserve(key, len as usize) {
        Ok(r) => r,
        Err(error) => {
            shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::Error(engine_refusal(&error));
        }
    };
    let id = shared.next_reservation.fetch_add(1, Ordering::Relaxed) + 1;
    let reply = ReservedReply {
        reservation: id,
        region_id: shared.handle.region_id,
        offset: reservation.payload_region_offset(),
        len,
        expires_ms: u32::try_from(shared.reservation_timeout.as_millis()).unwrap_or(u32::MAX),
    };
    reservations.insert(
        id,
        (Instant::now() + shared.reservation_timeout, reservation),
    );
    Response::Reserved(reply)
}

fn commit(shared: &Shared, id: u64, payload: Option<&[u8]>, durable: bool) -> Outcome<u64> {
    let refusal = |code, message: String| Outcome::Err(ErrorReply { code, message });
    let Some((_, mut reservation)) = shared.reservations.lock().remove(&id) else {
        return refusal(
            ErrorCode::BadRequest,
            format!("no reservation {id} (never made, committed, aborted, or expired)"),
        );
    };
    if let Some(payload) = payload {
        if payload.len() != reservation.payload_len() {
            return refusal(
                ErrorCode::BadRequest,
                format!(
                    "payload of {} bytes for a reservation of {}",
                    payload.len(),
                    reservation.payload_len()
                ),
            );
        }
        shared
            .metrics
            .bytes_in
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        // The one copy: from the request into the reserved space.
        reservation.payload_mut().copy_from_slice(payload);
    }
    let durability = if durable {
        Durability::WriteThrough
    } else {
        Durability::Memory
    };
    match shared.engine.commit(reservation, durability) {
        Ok(generation) => Outcome::Ok(generation),
        Err(error) => Outcome::Err(engine_refusal(&error)),
    }
}

fn node_stats(shared: &Shared) -> NodeStats {
    let stats = shared.engine.stats();
    NodeStats {
        tiers: stats
            .tiers
            .iter()
            .map(|t| TierFigures {
                tier: t.kind.to_string(),
                blocks: t.blocks,
                used_bytes: t.used_bytes,
                capacity_bytes: t.capacity_bytes,
                hits: t.hits,
                evictions: t.evictions,
            })
            .collect(),
        requests: shared.metrics.requests(),
        errors: shared.metrics.errors.load(Ordering::Relaxed),
        leases: shared.leases.lock().len() as u64,
        connections: shared.metrics.connections.load(Ordering::Relaxed),
        repair: shared.repair_stats.lock().as_ref().map(|r| r.figures()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_ok(None, b"anything"));
        assert!(token_ok(Some(b"secret"), b"secret"));
        assert!(!token_ok(Some(b"secret"), b"secreT"));
        assert!(!token_ok(Some(b"secret"), b"secret2"));
        assert!(!token_ok(Some(b"secret"), b""));
    }
}
