//! RDMA (feature `rdma`): one-sided reads by RDMA READ, through libibverbs.
//!
//! - The owner runs an [`RdmaServer`] next to its registry. A reader connects to it over TCP
//!   (the control channel); the two exchange [`QpEndpoint`] records and bring a
//!   reliable-connected queue pair each to ready-to-send. The reader then asks, once per
//!   region, for a grant ([`MapRequest`] → [`RdmaGrant`]): the owner checks the region's
//!   remote key, registers the region with its device (once) and answers with its address,
//!   length and the device's key for it.
//! - The reader's [`RdmaTransport`] posts RDMA READ work requests into a registered staging
//!   buffer per connection, polls their completions and copies each read into the caller's
//!   buffer. The owner's CPU does nothing per read: its device checks the key and bounds of
//!   every read against the registration; the reader checks bounds against the grant before
//!   posting, so an out-of-bounds read is refused with [`Error::OutOfBounds`] without ever
//!   reaching the wire.
//! - Unregistering a region deregisters it from the device before
//!   [`Registry::unregister`] returns: reads posted after that complete with a remote access
//!   error, the reader asks for a new grant, and the owner refuses it with
//!   [`Error::UnknownRegion`]. Reads in flight at that moment finish with the memory they
//!   started on, which the registration keeps mapped until the device lets go of it.
//!
//! With no device (no kernel support, no provider library, an empty device list, an inactive
//! port), [`RdmaServer::bind`] and [`RdmaTransport::connect`] return
//! [`Error::NoRdmaDevice`], and [`connect_with_fallback`] uses tcp instead.
//!
//! What is tested without hardware: discovery and fall-back, the handshake and grant frames
//! (also fuzzed), the queue-pair attributes of each state transition, the plan that splits a
//! batch into rounds that fit the staging buffer, bounds checks against a grant, and the
//! mapping of completion statuses. The verbs calls themselves (`verbs`) need a device.

mod verbs;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use parking_lot::Mutex;

use crate::conns::{Acceptor, read_frame_or_end};
use crate::registry::{Registry, Revoke};
use crate::wire::{
    ENDPOINT_BYTES, GRANT_BYTES, MAP_REQUEST_BYTES, MapRequest, QpEndpoint, RdmaGrant, Status,
};
use crate::{Error, MAX_READ_BYTES, ReadOp, RemoteSlice, Result, TcpTransport, Transport};
use verbs::{Context, Cq, Mr, Pd, PortInfo, Qp, ReadWr};

/// Settings of both sides of the RDMA transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Device to use, by name (as `ibv_devices` lists it); `None` takes the first.
    pub device: Option<String>,
    /// Port of the device, from 1. Default 1.
    pub port: u8,
    /// Index of the GID to use. Default 0; RoCE v2 usually wants the index of the port's
    /// RoCE v2 GID for its IP address (see `show_gids`).
    pub gid_index: u8,
    /// Registered staging buffer per reader connection, in bytes; a batch larger than this
    /// runs in several rounds. Default 8 MiB.
    pub staging_bytes: usize,
    /// RDMA READs posted at once per connection. Default 64.
    pub reads_in_flight: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: 0,
            staging_bytes: 8 << 20,
            reads_in_flight: 64,
        }
    }
}

impl RdmaConfig {
    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Error::Rdma {
            action: "accept the RDMA settings",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned()),
        };
        if self.port == 0 {
            return Err(bad("port numbers start at 1"));
        }
        if !(4096..=1 << 30).contains(&self.staging_bytes) {
            return Err(bad("staging_bytes must be between 4 KiB and 1 GiB"));
        }
        if !(1..=4096).contains(&self.reads_in_flight) {
            return Err(bad("reads_in_flight must be between 1 and 4096"));
        }
        Ok(())
    }
}

/// The RDMA devices this host has, by name.
///
/// # Errors
///
/// [`Error::NoRdmaDevice`] when the verbs library reports no kernel support, no permission,
/// or an empty list.
pub fn devices() -> Result<Vec<String>> {
    verbs::device_names()
}

/// Connects to an owner by RDMA when `rdma_addr` is given and this host has a usable device,
/// else (or if the RDMA connection cannot be set up) by tcp, saying why in the log.
///
/// # Errors
///
/// Those of [`TcpTransport::new`].
pub fn connect_with_fallback(
    tcp_addr: impl ToSocketAddrs,
    rdma_addr: Option<SocketAddr>,
    connections: usize,
    timeout: Duration,
) -> Result<Box<dyn Transport>> {
    if let Some(rdma_addr) = rdma_addr {
        match RdmaTransport::connect(rdma_addr, connections, timeout, RdmaConfig::default()) {
            Ok(transport) => return Ok(Box::new(transport)),
            Err(error @ Error::NoRdmaDevice { .. }) => {
                tracing::info!(%error, "RDMA unavailable; using tcp");
            }
            Err(error) => tracing::warn!(%error, "RDMA connection failed; using tcp"),
        }
    }
    Ok(Box::new(TcpTransport::new(tcp_addr, connections, timeout)?))
}

/// A random packet sequence number (24 bits).
fn random_psn() -> Result<u32> {
    let mut b = [0u8; 4];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| Error::io("draw a packet sequence number")(e.into()))?;
    Ok(u32::from_le_bytes(b) & 0x00ff_ffff)
}

fn local_endpoint(port: &PortInfo, qp_num: u32, psn: u32) -> QpEndpoint {
    QpEndpoint {
        qp_num,
        lid: port.lid,
        gid: port.gid,
        psn,
        mtu: port.mtu,
    }
}

/// One state change of a queue pair: attributes and the mask saying which are set.
struct Transition {
    attr: ffi::ibv_qp_attr,
    mask: u32,
}

/// The three transitions that take a new reliable-connected queue pair to ready-to-send,
/// connected to `peer`. The owner's side allows remote reads; the reader's allows nothing.
fn transitions(
    local: &PortInfo,
    local_psn: u32,
    peer: &QpEndpoint,
    allow_remote_read: bool,
) -> [Transition; 3] {
    use ffi::ibv_qp_attr_mask as m;
    let init = Transition {
        attr: ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: local.port,
            qp_access_flags: if allow_remote_read {
                ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
            } else {
                0
            },
            ..Default::default()
        },
        mask: (m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS).0,
    };
    let global = peer.gid != [0; 16];
    let mut ah = ffi::ibv_ah_attr {
        dlid: peer.lid,
        sl: 0,
        src_path_bits: 0,
        is_global: u8::from(global),
        port_num: local.port,
        ..Default::default()
    };
    if global {
        ah.grh.dgid.raw = peer.gid;
        ah.grh.sgid_index = local.gid_index;
        ah.grh.hop_limit = 64;
    }
    let rtr = Transition {
        attr: ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: ffi::ibv_mtu::from(local.mtu.min(peer.mtu)),
            dest_qp_num: peer.qp_num,
            rq_psn: peer.psn,
            max_dest_rd_atomic: local.max_dest_rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ah,
            ..Default::default()
        },
        mask: (m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER)
            .0,
    };
    let rts = Transition {
        attr: ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            // 4.096 µs * 2^14 ≈ 67 ms per try, 7 tries: a dead peer is reported in about 0.5 s.
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: local_psn,
            max_rd_atomic: local.max_rd_atomic,
            ..Default::default()
        },
        mask: (m::IBV_QP_STATE
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_MAX_QP_RD_ATOMIC)
            .0,
    };
    [init, rtr, rts]
}

fn connect_qp(qp: &Qp, local: &PortInfo, psn: u32, peer: &QpEndpoint, owner: bool) -> Result<()> {
    for t in transitions(local, psn, peer, owner) {
        qp.modify(t.attr, t.mask)?;
    }
    Ok(())
}

/// A piece of a read: `len` bytes at `op_offset` of read `op`, landing at `staging_offset` of
/// the staging buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    op: usize,
    op_offset: usize,
    staging_offset: usize,
    len: usize,
}

/// Splits reads of `lens` bytes into rounds: each round's pieces fit the staging buffer side
/// by side (starting at 64-byte boundaries) and number at most `max_pieces`. Empty reads get
/// no piece.
fn plan(lens: &[usize], staging: usize, max_pieces: usize) -> Vec<Vec<Piece>> {
    const ALIGN: usize = 64;
    let mut rounds = Vec::new();
    let mut round: Vec<Piece> = Vec::new();
    let mut used = 0usize;
    for (op, &len) in lens.iter().enumerate() {
        let mut done = 0;
        while done < len {
            let start = used.next_multiple_of(ALIGN);
            if round.len() == max_pieces || start >= staging {
                rounds.push(std::mem::take(&mut round));
                used = 0;
                continue;
            }
            let take = (len - done).min(staging - start);
            round.push(Piece {
                op,
                op_offset: done,
                staging_offset: start,
                len: take,
            });
            used = start + take;
            done += take;
        }
    }
    if !round.is_empty() {
        rounds.push(round);
    }
    rounds
}

/// The owner's address of `len` bytes at `offset` of a granted region, or the refusal the
/// owner would give.
fn remote_addr(grant: &RdmaGrant, offset: u64, len: usize) -> Result<u64> {
    let len = len as u64;
    if len > MAX_READ_BYTES {
        return Err(Error::TooLarge {
            len,
            max: MAX_READ_BYTES,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= grant.len => Ok(grant.addr + offset),
        _ => Err(Error::OutOfBounds {
            region_id: grant.region_id,
            offset,
            len,
        }),
    }
}

/// What a refusing grant means to the caller.
fn refusal_error(region_id: u64, status: Status) -> Error {
    match status {
        Status::BadRemoteKey => Error::BadRemoteKey { region_id },
        Status::UnknownRegion => Error::UnknownRegion { region_id },
        Status::NotShareable => Error::NotShareable { region_id },
        other => Error::UnexpectedStatus(other),
    }
}

/// The error of a completion that did not succeed; `None` for success.
fn completion_error(status: u32, vendor_err: u32) -> Option<Error> {
    (status != ffi::ibv_wc_status::IBV_WC_SUCCESS).then(|| Error::RdmaCompletion {
        status: verbs::status_text(status),
        vendor_err,
    })
}

// ---------------------------------------------------------------------------------------------
// Owner side

/// The owner's registrations with its device, one per granted region.
struct Grants {
    registry: Arc<Registry>,
    pd: Arc<Pd>,
    /// By region id. Held only here, so removing one deregisters it at once.
    registrations: Mutex<HashMap<u64, Mr>>,
}

impl Revoke for Grants {
    fn revoke(&self, region_id: u64) {
        // Dropping the registration deregisters it: reads posted later fail on the device.
        drop(self.registrations.lock().remove(&region_id));
    }
}

impl Grants {
    #[expect(
        unsafe_code,
        reason = "registering a region with the device; the contract is stated at the call"
    )]
    fn grant(&self, request: &MapRequest) -> RdmaGrant {
        let region_id = request.region_id;
        let region = match self.registry.lookup(region_id, request.remote_key) {
            Ok(region) => region,
            Err(Error::BadRemoteKey { .. }) => {
                return RdmaGrant::refusal(region_id, Status::BadRemoteKey);
            }
            Err(_) => return RdmaGrant::refusal(region_id, Status::UnknownRegion),
        };
        let len = region.handle.len;
        let mut registrations = self.registrations.lock();
        let mr = match registrations.entry(region_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let (addr, bytes) = (region.memory.as_ptr().cast_mut(), region.memory.len());
                // SAFETY: `MemorySource` promises the memory stays mapped while the value
                // lives; the registration keeps `region` (and so the memory) alive until it is
                // deregistered. Access is remote read only: the device never writes it.
                let registered = unsafe {
                    Mr::register(
                        &self.pd,
                        addr,
                        bytes,
                        ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0,
                        region,
                    )
                };
                match registered {
                    Ok(mr) => entry.insert(mr),
                    Err(error) => {
                        tracing::warn!(%error, region_id, "cannot register a region for RDMA");
                        return RdmaGrant::refusal(region_id, Status::NotShareable);
                    }
                }
            }
        };
        let grant = RdmaGrant {
            status: Status::Ok,
            region_id,
            addr: mr.addr(),
            len,
            rkey: mr.rkey(),
        };
        drop(registrations);
        // Unregistered meanwhile? Then the revoker ran before our registration was recorded,
        // or will find it; either way, do not hand out the key.
        if self.registry.lookup(region_id, request.remote_key).is_err() {
            self.revoke(region_id);
            return RdmaGrant::refusal(region_id, Status::UnknownRegion);
        }
        grant
    }
}

/// The owner's RDMA control listener: connects queue pairs and grants regions. Dropping it
/// stops accepting and closes every connection (destroying its queue pair); the regions it
/// registered are deregistered once the last connection thread has let go of them.
pub struct RdmaServer {
    acceptor: Acceptor,
    device: String,
}

impl std::fmt::Debug for RdmaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaServer")
            .field("local_addr", &self.local_addr())
            .field("device", &self.device)
            .finish()
    }
}

impl RdmaServer {
    /// Opens the device and listens on `addr` for readers' control connections.
    ///
    /// # Errors
    ///
    /// [`Error::NoRdmaDevice`] when there is no usable device; [`Error::Rdma`] when the
    /// device refuses a resource; [`Error::Io`] if `addr` cannot be bound.
    pub fn bind(
        addr: impl ToSocketAddrs,
        registry: Arc<Registry>,
        config: &RdmaConfig,
    ) -> Result<Self> {
        config.validate()?;
        let context = Context::open(config.device.as_deref(), config.port, config.gid_index)?;
        let device = context.name.clone();
        let pd = Pd::new(&context)?;
        let grants = Arc::new(Grants {
            registry: Arc::clone(&registry),
            pd,
            registrations: Mutex::new(HashMap::new()),
        });
        let revoker: Arc<dyn Revoke> = grants.clone();
        registry.add_revoker(Arc::downgrade(&revoker));
        let listener =
            TcpListener::bind(addr).map_err(Error::io("bind the RDMA control listener"))?;
        let acceptor = Acceptor::spawn(listener, "rdma", move |stream, _| {
            owner_serve(stream, &grants)
        })?;
        Ok(Self { acceptor, device })
    }

    /// Where the control listener listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }
}

/// Connects a queue pair to the reader, then answers grant requests until the reader hangs up.
fn owner_serve(mut stream: TcpStream, grants: &Grants) -> Result<()> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(Error::io("set a read timeout"))?;
    let mut frame = [0u8; ENDPOINT_BYTES];
    stream
        .read_exact(&mut frame)
        .map_err(Error::io("read the reader's endpoint"))?;
    let peer = QpEndpoint::decode(&frame)?;
    let context = &grants.pd.context;
    let cq = Cq::new(context, 4)?;
    let qp = Qp::new(&grants.pd, &cq, 1)?;
    let psn = random_psn()?;
    connect_qp(&qp, &context.port, psn, &peer, true)?;
    stream
        .write_all(&local_endpoint(&context.port, qp.num(), psn).encode())
        .map_err(Error::io("send the owner's endpoint"))?;
    // From here the reader reads at will; this thread only answers grant requests.
    stream
        .set_read_timeout(None)
        .map_err(Error::io("clear the read timeout"))?;
    let mut request = [0u8; MAP_REQUEST_BYTES];
    loop {
        if !read_frame_or_end(&mut stream, &mut request, "read a grant request")? {
            return Ok(());
        }
        let request = MapRequest::decode(&request)?;
        stream
            .write_all(&grants.grant(&request).encode())
            .map_err(Error::io("send a grant"))?;
    }
    // `qp` drops here, after the reader is gone.
}

// ---------------------------------------------------------------------------------------------
// Reader side

/// One reader connection. Field order is drop order: the queue pair goes first, so the device
/// has stopped writing into the staging buffer before it is deregistered and unmapped.
struct Connection {
    qp: Qp,
    cq: Arc<Cq>,
    staging: verbs::Staging,
    control: TcpStream,
}

/// The reader's side: RDMA READs from one owner over a pool of queue pairs.
pub struct RdmaTransport {
    addr: SocketAddr,
    pd: Arc<Pd>,
    config: RdmaConfig,
    timeout: Duration,
    connections: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
    /// Grants by (region id, remote key): a cached grant is only used with the key that won it.
    grants: Mutex<HashMap<(u64, u64), RdmaGrant>>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("addr", &self.addr)
            .field("device", &self.pd.context.name)
            .field("connections", &self.connections.len())
            .finish()
    }
}

impl RdmaTransport {
    /// Opens the device and connects one queue pair to the owner's [`RdmaServer`] at `addr`
    /// (more, up to `connections`, as batches need them). `timeout` bounds every control
    /// exchange and every wait for completions.
    ///
    /// # Errors
    ///
    /// [`Error::NoRdmaDevice`] when this host has no usable device (checked before anything
    /// touches the network); [`Error::Rdma`], [`Error::Io`] or [`Error::Protocol`] when the
    /// connection cannot be set up.
    pub fn connect(
        addr: SocketAddr,
        connections: usize,
        timeout: Duration,
        config: RdmaConfig,
    ) -> Result<Self> {
        config.validate()?;
        let context = Context::open(config.device.as_deref(), config.port, config.gid_index)?;
        let pd = Pd::new(&context)?;
        let transport = Self {
            addr,
            pd,
            config,
            timeout,
            connections: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            grants: Mutex::new(HashMap::new()),
        };
        let first = transport.open_connection()?;
        *transport.connections[0].lock() = Some(first);
        Ok(transport)
    }

    fn open_connection(&self) -> Result<Connection> {
        let mut control = TcpStream::connect_timeout(&self.addr, self.timeout)
            .map_err(Error::io("connect to the owner's RDMA control listener"))?;
        control
            .set_nodelay(true)
            .map_err(Error::io("set TCP_NODELAY"))?;
        control
            .set_read_timeout(Some(self.timeout))
            .map_err(Error::io("set a read timeout"))?;
        control
            .set_write_timeout(Some(self.timeout))
            .map_err(Error::io("set a write timeout"))?;
        let context = &self.pd.context;
        let depth = self
            .config
            .reads_in_flight
            .min(context.port.max_qp_wr.max(1));
        let cq = Cq::new(context, depth)?;
        let qp = Qp::new(&self.pd, &cq, depth)?;
        let staging = verbs::Staging::new(&self.pd, self.config.staging_bytes)?;
        let psn = random_psn()?;
        control
            .write_all(&local_endpoint(&context.port, qp.num(), psn).encode())
            .map_err(Error::io("send the reader's endpoint"))?;
        let mut frame = [0u8; ENDPOINT_BYTES];
        control
            .read_exact(&mut frame)
            .map_err(Error::io("read the owner's endpoint"))?;
        let peer = QpEndpoint::decode(&frame)?;
        connect_qp(&qp, &context.port, psn, &peer, false)?;
        Ok(Connection {
            qp,
            cq,
            staging,
            control,
        })
    }

    /// The grant for `src`'s region, asked of the owner on first use.
    fn grant(&self, connection: &mut Connection, src: RemoteSlice) -> Result<RdmaGrant> {
        let key = (src.region_id, src.remote_key);
        if let Some(grant) = self.grants.lock().get(&key) {
            return Ok(*grant);
        }
        let request = MapRequest {
            region_id: src.region_id,
            remote_key: src.remote_key,
        };
        connection
            .control
            .write_all(&request.encode())
            .map_err(Error::io("ask for a grant"))?;
        let mut frame = [0u8; GRANT_BYTES];
        connection
            .control
            .read_exact(&mut frame)
            .map_err(Error::io("read a grant"))?;
        let grant = RdmaGrant::decode(&frame)?;
        if grant.region_id != src.region_id {
            return Err(crate::wire::FrameError::BadField {
                field: "region_id",
                value: grant.region_id,
            }
            .into());
        }
        if grant.status != Status::Ok {
            return Err(refusal_error(src.region_id, grant.status));
        }
        self.grants.lock().insert(key, grant);
        Ok(grant)
    }

    /// Runs `ops` on connection `index`; reads that fail on the device are retried once on a
    /// fresh connection with a fresh grant (the region may have been unregistered, and the
    /// owner then says so).
    fn run_on(&self, index: usize, ops: &mut [ReadOp<'_>]) -> Vec<Result<()>> {
        let mut slot = self.connections[index].lock();
        let mut results: Vec<Result<()>> = ops.iter().map(|_| Ok(())).collect();
        let mut pending: Vec<usize> = (0..ops.len()).collect();
        for attempt in 0..2 {
            if pending.is_empty() {
                break;
            }
            let mut connection = match slot.take() {
                Some(c) => c,
                None => match self.open_connection() {
                    Ok(c) => c,
                    Err(error) => {
                        let text = error.to_string();
                        for &i in &pending {
                            results[i] = Err(Error::Io {
                                action: "connect to the owner by RDMA",
                                source: std::io::Error::other(text.clone()),
                            });
                        }
                        return results;
                    }
                },
            };
            let healthy = self.run_pending(&mut connection, ops, &pending, &mut results);
            if healthy {
                *slot = Some(connection);
            }
            // Retry only what failed on the device or the connection, not the owner's refusals.
            pending.retain(|&i| {
                matches!(
                    results[i],
                    Err(Error::RdmaCompletion { .. } | Error::Io { .. } | Error::Rdma { .. })
                )
            });
            if attempt == 0 {
                let mut grants = self.grants.lock();
                for &i in &pending {
                    grants.remove(&(ops[i].src.region_id, ops[i].src.remote_key));
                }
            }
        }
        results
    }

    /// Reads `pending` of `ops`; returns whether the connection can be used again.
    fn run_pending(
        &self,
        connection: &mut Connection,
        ops: &mut [ReadOp<'_>],
        pending: &[usize],
        results: &mut [Result<()>],
    ) -> bool {
        // Grants and bounds first: refusals never reach the device.
        let mut runnable: Vec<(usize, u64, u32)> = Vec::with_capacity(pending.len());
        for &i in pending {
            let src = ops[i].src;
            let checked = self
                .grant(connection, src)
                .and_then(|g| Ok((remote_addr(&g, src.offset, ops[i].dst.len())?, g.rkey)));
            match checked {
                Ok((addr, rkey)) => {
                    results[i] = Ok(());
                    runnable.push((i, addr, rkey));
                }
                Err(error @ (Error::Io { .. } | Error::Protocol(_))) => {
                    // The control channel is out of step: give up on this connection.
                    let text = error.to_string();
                    results[i] = Err(error);
                    for &j in pending {
                        if results[j].is_ok() {
                            results[j] = Err(Error::Io {
                                action: "ask the owner for a grant",
                                source: std::io::Error::other(text.clone()),
                            });
                        }
                    }
                    return false;
                }
                Err(error) => results[i] = Err(error),
            }
        }
        let lens: Vec<usize> = runnable.iter().map(|&(i, _, _)| ops[i].dst.len()).collect();
        // Bytes of each runnable read not yet delivered.
        let mut remaining = lens.clone();
        let max_pieces = self.config.reads_in_flight as usize;
        let mut completions = vec![ffi::ibv_wc::default(); max_pieces];
        let mut healthy = true;
        for round in plan(&lens, connection.staging.len(), max_pieces) {
            let wrs: Vec<ReadWr> = round
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let (_, addr, rkey) = runnable[p.op];
                    ReadWr {
                        wr_id: k as u64,
                        local_addr: connection.staging.addr() + p.staging_offset as u64,
                        lkey: connection.staging.lkey(),
                        len: u32::try_from(p.len).unwrap_or(u32::MAX),
                        remote_addr: addr + p.op_offset as u64,
                        rkey,
                    }
                })
                .collect();
            match self.run_round(connection, &wrs, &mut completions) {
                Ok(statuses) => {
                    for (piece, status) in round.iter().zip(statuses) {
                        let i = runnable[piece.op].0;
                        match status {
                            None if results[i].is_ok() => {
                                let end = piece.op_offset + piece.len;
                                connection.staging.copy_out(
                                    piece.staging_offset,
                                    &mut ops[i].dst[piece.op_offset..end],
                                );
                                remaining[piece.op] -= piece.len;
                            }
                            None => {}
                            Some(error) => {
                                // An error moves the queue pair to the error state: what
                                // follows would only be flushed.
                                healthy = false;
                                results[i] = Err(error);
                            }
                        }
                    }
                }
                Err(error) => {
                    healthy = false;
                    let text = error.to_string();
                    for (k, &(i, _, _)) in runnable.iter().enumerate() {
                        if remaining[k] > 0 && results[i].is_ok() {
                            results[i] = Err(Error::Io {
                                action: "read by RDMA",
                                source: std::io::Error::other(text.clone()),
                            });
                        }
                    }
                }
            }
            if !healthy {
                break;
            }
        }
        for (k, &(i, _, _)) in runnable.iter().enumerate() {
            if remaining[k] > 0 && results[i].is_ok() {
                results[i] = Err(Error::RdmaCompletion {
                    status: "not run: an earlier read broke the connection".to_owned(),
                    vendor_err: 0,
                });
            }
        }
        healthy
    }

    /// Posts one round and waits for all of its completions; returns each read's error, if
    /// any, by position.
    #[expect(
        unsafe_code,
        reason = "posting reads into the staging buffer; the contract is stated at the call"
    )]
    fn run_round(
        &self,
        connection: &Connection,
        wrs: &[ReadWr],
        completions: &mut [ffi::ibv_wc],
    ) -> Result<Vec<Option<Error>>> {
        // SAFETY: every local range lies in this connection's staging registration
        // (`plan` keeps pieces inside it); nothing reads the staging buffer until the
        // completions below are polled, and if they are not (timeout), the connection is
        // dropped: its queue pair is destroyed before the staging buffer is released.
        unsafe { connection.qp.post_reads(wrs) }?;
        let mut statuses: Vec<Option<Option<Error>>> = (0..wrs.len()).map(|_| None).collect();
        let mut left = wrs.len();
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        while left > 0 {
            let n = connection.cq.poll(completions)?;
            for wc in &completions[..n] {
                let k = usize::try_from(wc.wr_id()).unwrap_or(usize::MAX);
                let Some(slot) = statuses.get_mut(k) else {
                    continue;
                };
                if slot.is_none() {
                    left -= 1;
                }
                *slot = Some(wc.error().and_then(|(s, v)| completion_error(s, v)));
            }
            if n == 0 {
                spins += 1;
                if spins % 1024 == 0 {
                    if Instant::now() > deadline {
                        return Err(Error::Io {
                            action: "wait for RDMA completions",
                            source: std::io::ErrorKind::TimedOut.into(),
                        });
                    }
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        Ok(statuses.into_iter().map(Option::flatten).collect())
    }
}

impl Transport for RdmaTransport {
    fn read(&self, src: RemoteSlice, dst: &mut [u8]) -> Result<()> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let mut ops = [ReadOp { src, dst }];
        self.run_on(index, &mut ops).remove(0)
    }

    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<()>> {
        crate::spread_batch(
            ops,
            self.connections.len(),
            self.config.reads_in_flight as usize,
            &self.next,
            |i, chunk| self.run_on(i, chunk),
        )
    }
}

#[cfg(test)]
mod tests;
