//! The client: control requests to a node, and verified one-sided reads of its blocks.
//!
//! `mod.rs` has the connection and the control requests (puts, exists, prefix_match, ...);
//! `reads.rs` the read path; `cache.rs` the descriptor cache.

mod cache;
mod reads;

use cache::DescriptorCache;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use mooncake_kv_format::ChainEnd;
use mooncake_kv_transfer::{ShmTransport, TcpTransport, Transport};
use parking_lot::Mutex;

use crate::proto::{
    ChainLinks, ErrorReply, FrameError, HelloReply, NodeStats, Outcome, ReadFrameError, Request,
    ReservedReply, Response, decode_response, encode_body, read_frame,
};

/// Which data path reads blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// Shared memory when the node is on this host (it offers a socket and the control
    /// address is loopback), tcp otherwise.
    #[default]
    Auto,
    /// Always the tcp data plane.
    Tcp,
    /// Always shared memory; connecting fails if the node offers none.
    Shm,
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The node's shared secret, if it has one.
    pub token: Option<Vec<u8>>,
    /// Bounds connecting and every request. Default 5 s.
    pub timeout: Duration,
    /// Control connections (and tcp data connections) in the pool. Default 4.
    pub connections: usize,
    /// Data path. Default [`TransportChoice::Auto`].
    pub transport: TransportChoice,
    /// Lookups per read before giving up on a block that keeps changing under the reader.
    /// Default 4.
    pub max_attempts: u32,
    /// When reads go over tcp, ask for each block inline, right after the lookup's answer on
    /// the control connection: one round trip instead of two (lookup, then a read on the data
    /// plane). The bytes are verified the same way. Default true.
    pub inline_tcp_reads: bool,
    /// An inline batch with at least 4 MiB of buffers per connection is read over up to this
    /// many of the pool's connections at once, a thread each (the calling thread one of
    /// them): one tcp stream keeps one core busy at each end, and a prefix of tens of MiB
    /// then waits on one core while the others idle. Default: the cores this process may run
    /// on (`std::thread::available_parallelism`); 1 keeps every batch on one connection.
    pub batch_lanes: usize,
    /// One-sided reads (shared memory, or tcp without inline reads) reuse a block's
    /// descriptor this long after the lookup that returned it, so a block read again soon
    /// costs no round trip to the node. Every read is verified as usual; one that fails (the
    /// block moved, was evicted, removed or replaced, and its space freed: the node zeroes a
    /// freed block's header) drops the descriptor and looks up again. What it can miss: a
    /// block another client removed or replaced stays readable while a lease on it lasts
    /// (its space is freed only then). A node that died is noticed within 10 ms over shared
    /// memory (the transport watches its socket) and at once over tcp. This client's own
    /// puts and removes drop its descriptors of those keys at once. `Duration::ZERO` turns
    /// the cache off. Default 10 s.
    pub descriptor_ttl: Duration,
    /// Descriptors the cache holds at most. Default 16,384.
    pub descriptor_cache_entries: usize,
    /// Over shared memory, also checksum every payload (CRC32) as it is copied. Off by
    /// default: a same-host read copies the payload, then checks the block's header (magic,
    /// CRCs of header and key, key, generation), which catches a slot freed or reused
    /// meanwhile because the node zeroes a block's header before its space can be reused
    /// (docs/format.md, "Reading a block in place"). The payload CRC adds a check against
    /// corrupted memory, for a quarter to a third of the read's throughput. Reads over tcp
    /// always check it.
    pub shm_payload_crc: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            token: None,
            timeout: Duration::from_secs(5),
            connections: 4,
            transport: TransportChoice::Auto,
            max_attempts: 4,
            inline_tcp_reads: true,
            batch_lanes: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            descriptor_ttl: Duration::from_secs(10),
            descriptor_cache_entries: 1 << 14,
            shm_payload_crc: false,
        }
    }
}

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection to the node failed.
    #[error("cannot {action}: {source}")]
    Io {
        /// What was being attempted.
        action: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The node sent bytes that are not a valid frame or response.
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// The node refused the request.
    #[error("refused by the node ({:?}): {}", .0.code, .0.message)]
    Refused(ErrorReply),
    /// The one-sided read failed (refused by the owner, or the data path broke).
    #[error("read failed: {0}")]
    Transfer(#[from] mooncake_kv_transfer::Error),
    /// The block changed under every attempt to read it.
    #[error("block still changing after {attempts} lookups")]
    Stale {
        /// Lookups made.
        attempts: u32,
    },
    /// The caller's buffer is smaller than the value.
    #[error("buffer of {available} bytes is smaller than the value's {needed}")]
    BufferTooSmall {
        /// Bytes of the value.
        needed: usize,
        /// Bytes of the buffer.
        available: usize,
    },
    /// The block failed verification the same way on two reads in a row (the same block,
    /// not one that changed between them): its bytes at the node are damaged. The node was
    /// told, and drops it if its own check agrees.
    /// (Or the node's own check of the block failed as it was looked up: it was dropped.)
    #[error(
        "block {key}{} is damaged at the node{}",
        .generation.map(|g| format!(" (generation {g})")).unwrap_or_default(),
        if *.dropped { ", which dropped it" } else { " (the node's own check passed)" }
    )]
    Corrupt {
        /// The key, as text when printable, else hex.
        key: String,
        /// The block's generation, when the client read it.
        generation: Option<u64>,
        /// Whether the node found the damage too and dropped the block.
        dropped: bool,
    },
    /// [`TransportChoice::Shm`] was asked for and this client cannot read the node's memory.
    #[error("shared memory is unavailable: {0}")]
    NoSharedMemory(String),
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

impl ClientError {
    /// The same failure again, for a caller that reports one failed request once per item it
    /// carried: the same variant and message (an I/O error keeps its kind and text, a
    /// transfer error becomes an I/O error with its text).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Io { action, source } => Self::Io {
                action,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Self::Protocol(error) => Self::Protocol(error.clone()),
            Self::Refused(reply) => Self::Refused(reply.clone()),
            Self::Transfer(error) => Self::Io {
                action: "read",
                source: std::io::Error::other(error.to_string()),
            },
            &Self::Stale { attempts } => Self::Stale { attempts },
            &Self::BufferTooSmall { needed, available } => {
                Self::BufferTooSmall { needed, available }
            }
            Self::NoSharedMemory(reason) => Self::NoSharedMemory(reason.clone()),
            Self::Corrupt {
                key,
                generation,
                dropped,
            } => Self::Corrupt {
                key: key.clone(),
                generation: *generation,
                dropped: *dropped,
            },
        }
    }
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { action, source }
}

/// Which block a descriptor names: its offset in the region and its generation. A block that
/// changed between two reads has another (a new put has a new generation; a block moved
/// has another offset).
type BlockId = (u64, u64);

/// What an inline read found.
enum Inline {
    Miss,
    /// The payload's length, in the caller's buffer.
    Read(usize),
    Owned(Vec<u8>),
    /// The bytes of the block at this offset, of this generation, did not verify.
    Mismatch(BlockId),
}

/// Read-ahead on a control connection: enough for a frame header, a typical answer and a
/// block header, and small so that the bytes of a block that follow are read straight into
/// their buffer, not copied out of this one (at most this much of a payload is).
const CONTROL_BUFFER: usize = 4096;

struct Control {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    body: Vec<u8>,
}

/// A connection to one node. `Send + Sync`: share it between threads.
pub struct Client {
    addr: SocketAddr,
    config: ClientConfig,
    hello: HelloReply,
    pool: Vec<Mutex<Option<Control>>>,
    /// The pool's connection taken last: where the next call looks first.
    next: AtomicUsize,
    next_request: AtomicU64,
    transport: Box<dyn Transport>,
    transport_name: &'static str,
    /// Why reads do not go over shared memory, when they do not.
    shm_unavailable: Option<String>,
    retries: AtomicU64,
    /// Stale reads not yet reported to the node (sent with the next lookup).
    unreported_stale: AtomicU64,
    /// Leases of blocks this client has finished reading, ended with its next lookup.
    done_leases: Mutex<Vec<u64>>,
    /// Descriptors of blocks read lately (see [`ClientConfig::descriptor_ttl`]).
    descriptors: Mutex<DescriptorCache>,
    cached_reads: AtomicU64,
    /// `cached_reads` as last reported to the node (with a lookup); the read path never
    /// touches it.
    reported_cached_reads: AtomicU64,
    /// Keys of cached reads not yet reported to the node (at most `MAX_CACHED_KEYS`).
    unreported_cached_keys: Mutex<Vec<Vec<u8>>>,
    /// Its length, readable without the lock.
    unreported_cached_key_count: AtomicUsize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("transport", &self.transport_name)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the node at `addr` (its control plane), says hello (with the token), and
    /// opens the data path.
    ///
    /// # Errors
    ///
    /// [`ClientError::Io`] if the node cannot be reached, [`ClientError::Refused`] for a
    /// wrong token, [`ClientError::Transfer`] if the data path cannot be opened.
    pub fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self> {
        let addr = addr
            .to_socket_addrs()
            .map_err(io("resolve the node's address"))?
            .next()
            .ok_or_else(|| ClientError::Io {
                action: "resolve the node's address",
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        let (control, hello) = open_control(addr, &config)?;
        let mut data_addr: SocketAddr = hello.data_addr.parse().map_err(|_| {
            ClientError::Protocol(FrameError::Malformed(format!(
                "data address {:?}",
                hello.data_addr
            )))
        })?;
        if data_addr.ip().is_unspecified() {
            data_addr.set_ip(addr.ip());
        }
        let connections = config.connections.max(1);
        let tcp = || TcpTransport::new(data_addr, connections, config.timeout);
        // Shared memory when the node offers it and this client can use it; else why not.
        let shm = match (hello.shm_path.as_deref(), addr.ip().is_loopback()) {
            (None, _) => Err("the node offers no shared-memory socket".to_owned()),
            (Some(_), false) => Err(format!(
                "the node is not on this host (its address {addr} is not loopback)"
            )),
            (Some(path), true) => ShmTransport::connect(path)
                .map_err(|error| format!("cannot use its socket {path}: {error}")),
        };
        let (transport, transport_name, shm_unavailable): (Box<dyn Transport>, _, _) =
            match (config.transport, shm) {
                (TransportChoice::Tcp, _) => (Box::new(tcp()?), "tcp", None),
                (_, Ok(shm)) => (Box::new(shm), "shm", None),
                (TransportChoice::Shm, Err(reason)) => {
                    return Err(ClientError::NoSharedMemory(reason));
                }
                (TransportChoice::Auto, Err(reason)) => {
                    // A node elsewhere is the usual case; one on this host whose socket
                    // cannot be used is worth a line in the log.
                    if hello.shm_path.is_some() && addr.ip().is_loopback() {
                        tracing::warn!(%reason, "reading over tcp: shared memory is unavailable");
                    }
                    (Box::new(tcp()?), "tcp", Some(reason))
                }
            };
        let pool: Vec<_> = (0..connections).map(|_| Mutex::new(None)).collect();
        *pool[0].lock() = Some(control);
        Ok(Self {
            addr,
            config,
            hello,
            pool,
            next: AtomicUsize::new(0),
            next_request: AtomicU64::new(1),
            transport,
            transport_name,
            shm_unavailable,
            retries: AtomicU64::new(0),
            unreported_stale: AtomicU64::new(0),
            done_leases: Mutex::new(Vec::new()),
            descriptors: Mutex::new(DescriptorCache::default()),
            cached_reads: AtomicU64::new(0),
            reported_cached_reads: AtomicU64::new(0),
            unreported_cached_keys: Mutex::new(Vec::new()),
            unreported_cached_key_count: AtomicUsize::new(0),
        })
    }

    /// The node's control address, as connected to.
    pub fn control_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The data path in use: `"shm"` or `"tcp"`.
    pub fn transport_name(&self) -> &'static str {
        self.transport_name
    }

    /// Why reads do not go over shared memory, when they go over tcp though
    /// [`TransportChoice::Auto`] would have taken it: the node offers none, is on another
    /// host, or its socket could not be used (gone, or not this user's to connect to).
    pub fn shm_unavailable(&self) -> Option<&str> {
        self.shm_unavailable.as_deref()
    }

    /// What the node said when this client connected.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// A read failed verification and will be looked up again.
    fn count_stale_read(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.unreported_stale.fetch_add(1, Ordering::Relaxed);
    }

    /// The stale reads to report with the lookup about to be sent.
    fn take_unreported_stale(&self) -> u32 {
        u32::try_from(self.unreported_stale.swap(0, Ordering::Relaxed)).unwrap_or(u32::MAX)
    }

    /// The cached reads to report with the lookup about to be sent. Racing lookups split the
    /// count between them (each reports what its count adds to the largest reported so far),
    /// so each read is reported once.
    fn take_unreported_cached(&self) -> u32 {
        let now = self.cached_reads.load(Ordering::Relaxed);
        let before = self.reported_cached_reads.fetch_max(now, Ordering::Relaxed);
        u32::try_from(now.saturating_sub(before)).unwrap_or(u32::MAX)
    }

    /// The keys of cached reads to report with the lookup about to be sent (so the node
    /// counts them as uses), taken from the list.
    fn take_cached_keys(&self) -> Vec<Vec<u8>> {
        let mut keys = self.unreported_cached_keys.lock();
        self.unreported_cached_key_count.store(0, Ordering::Relaxed);
        std::mem::take(&mut *keys)
    }

    /// Reads that failed verification (the block moved or changed between lookup and read)
    /// and were looked up again.
    pub fn verification_retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Reads served from a cached descriptor, with no lookup (see
    /// [`ClientConfig::descriptor_ttl`]).
    pub fn cached_reads(&self) -> u64 {
        self.cached_reads.load(Ordering::Relaxed)
    }

    /// Whether one-sided reads check the header after the copy instead of a payload CRC
    /// (see [`ClientConfig::shm_payload_crc`]).
    fn in_place(&self) -> bool {
        self.transport_name == "shm" && !self.config.shm_payload_crc
    }

    fn caching(&self) -> bool {
        !self.inline() && !self.config.descriptor_ttl.is_zero()
    }

    /// Sends one request and waits for its response. A pooled connection that turns out to be
    /// broken is replaced and the request sent once more.
    fn call(&self, request: &Request<'_>) -> Result<Response> {
        self.call_then(request, &[], |_, response| Ok(response))
    }

    /// Sends one request, then hands its response and the connection to `then` (which may
    /// read bytes that follow the response). The connection goes back to the pool unless
    /// `then` or the exchange failed in a way that leaves the stream out of step.
    fn call_then<T>(
        &self,
        request: &Request<'_>,
        trailer: &[&[u8]],
        mut then: impl FnMut(&mut Control, Response) -> Result<T>,
    ) -> Result<T> {
        let body = encode_body(request);
        // The connection taken last if it is idle (a caller that waits for each answer keeps
        // one connection, and the node's worker that lingers on it), else the next idle one
        // after it; wait only when all are busy.
        let start = self.next.load(Ordering::Relaxed);
        let n = self.pool.len();
        let mut slot = (0..n)
            .find_map(|i| {
                let at = (start + i) % n;
                let slot = self.pool[at].try_lock()?;
                self.next.store(at, Ordering::Relaxed);
                Some(slot)
            })
            .unwrap_or_else(|| self.pool[start % n].lock());
        for attempt in 0..2 {
            let reused = slot.is_some();
            let mut control = match slot.take() {
                Some(c) => c,
                None => open_control(self.addr, &self.config)?.0,
            };
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            match exchange(&mut control, id, &body, trailer) {
                Ok(Response::Error(reply)) => {
                    *slot = Some(control);
                    return Err(ClientError::Refused(reply));
                }
                Ok(response) => {
                    let result = then(&mut control, response);
                    if !matches!(
                        result,
                        Err(ClientError::Io { .. } | ClientError::Protocol(_))
                    ) {
                        *slot = Some(control);
                    }
                    return result;
                }
                Err(ClientError::Io { .. }) if reused && attempt == 0 => {}
                Err(error) => return Err(error),
            }
        }
        Err(ClientError::Io {
            action: "reach the node",
            source: std::io::ErrorKind::ConnectionAborted.into(),
        })
    }

    /// Stores `value` under `key`; returns the block's generation.
    ///
    /// # Errors
    ///
    /// [`ClientError::Refused`] with the node's reason (too large, no space, ...), or a
    /// connection error.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<u64> {
        let mut outcomes = self.put_batch(&[(key, value)], false)?;
        match outcomes.pop() {
            Some(Ok(generation)) => Ok(generation),
            Some(Err(reply)) => Err(ClientError::Refused(reply)),
            None => Err(FrameError::Malformed("empty put response".to_owned()).into()),
        }
    }

    /// Stores several blocks in one request; `durable` makes each durable before the answer
    /// (write-through). One outcome per item, in order.
    ///
    /// # Errors
    ///
    /// When the request as a whole fails.
    pub fn put_batch(
        &self,
        items: &[(&[u8], &[u8])],
        durable: bool,
    ) -> Result<Vec<Result<u64, ErrorReply>>> {
        self.put_items(items, durable, None)
    }

    /// Stores the blocks of one prefix chain in one request, in order, the first following
    /// `parent` (the key of the block before them, if the chain continues one the node may
    /// hold), `end` saying whether the last block is full or partial: what the engine's
    /// `put_chain_with` does, on the node. The links are hints for the node's eviction (see
    /// [`ChainEnd`]). One outcome per item, in order.
    ///
    /// # Errors
    ///
    /// When the request as a whole fails.
    pub fn put_chain(
        &self,
        parent: Option<&[u8]>,
        items: &[(&[u8], &[u8])],
        end: ChainEnd,
        durable: bool,
    ) -> Result<Vec<Result<u64, ErrorReply>>> {
        let links = ChainLinks {
            parent,
            partial_end: end == ChainEnd::Partial,
        };
        self.put_items(items, durable, Some(links))
    }

    fn put_items(
        &self,
        items: &[(&[u8], &[u8])],
        durable: bool,
        chain: Option<ChainLinks<'_>>,
    ) -> Result<Vec<Result<u64, ErrorReply>>> {
        let limit = mooncake_kv_format::MAX_VALUE_BYTES;
        let mut lens = Vec::with_capacity(items.len());
        for (key, value) in items {
            match u32::try_from(value.len()) {
                Ok(len) if value.len() <= limit => lens.push((*key, len)),
                _ => {
                    return Err(ClientError::Refused(ErrorReply {
                        code: crate::proto::ErrorCode::TooLarge,
                        message: format!(
                            "value of {} bytes exceeds the limit of {limit} (not sent)",
                            value.len()
                        ),
                    }));
                }
            }
        }
        // The values follow the frame straight from the caller's buffers.
        let values: Vec<&[u8]> = items.iter().map(|(_, v)| *v).collect();
        let response = self.call_then(
            &Request::Put {
                items: lens,
                durable,
                chain,
            },
            &values,
            |_, response| Ok(response),
        );
        // Whatever the answer, the blocks may have changed.
        self.forget(items.iter().map(|(key, _)| *key));
        let Response::Put(outcomes) = response? else {
            return Err(unexpected("put"));
        };
        if outcomes.len() != items.len() {
            return Err(unexpected("put"));
        }
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Ok(g) => Ok(g),
                Outcome::Err(e) => Err(e),
            })
            .collect())
    }

    /// The first half of a two-phase put: room on the node for `len` payload bytes under
    /// `key`. Commit it with [`commit`](Self::commit) before it expires.
    ///
    /// # Errors
    ///
    /// [`ClientError::Refused`] (too large, no space), connection errors.
    pub fn reserve(&self, key: &[u8], len: u32) -> Result<ReservedReply> {
        match self.call(&Request::Reserve { key, len })? {
            Response::Reserved(reply) if reply.len == len => Ok(reply),
            _ => Err(unexpected("reserve")),
        }
    }

    /// The second half: makes the reserved block visible. Over tcp the payload travels with
    /// this request (`Some`); a transport that writes one-sidedly would have put it in place
    /// (`None`). Returns the block's generation.
    ///
    /// # Errors
    ///
    /// [`ClientError::Refused`] for an unknown or expired reservation or a payload of the
    /// wrong length; connection errors.
    pub fn commit(
        &self,
        reservation: &ReservedReply,
        payload: Option<&[u8]>,
        durable: bool,
    ) -> Result<u64> {
        let response = self.call(&Request::Commit {
            reservation: reservation.reservation,
            payload,
            durable,
        });
        // A reservation does not say its key: every cached descriptor goes.
        self.descriptors.lock().forget_all();
        match response? {
            Response::Put(mut outcomes) if outcomes.len() == 1 => match outcomes.pop() {
                Some(Outcome::Ok(generation)) => Ok(generation),
                Some(Outcome::Err(reply)) => Err(ClientError::Refused(reply)),
                None => Err(unexpected("commit")),
            },
            _ => Err(unexpected("commit")),
        }
    }

    /// Gives a reservation back at once; says whether it was still open.
    ///
    /// # Errors
    ///
    /// Connection errors.
    pub fn abort(&self, reservation: &ReservedReply) -> Result<bool> {
        match self.call(&Request::Abort {
            reservation: reservation.reservation,
        })? {
            Response::Flags(flags) if flags.len() == 1 => Ok(flags[0]),
            _ => Err(unexpected("abort")),
        }
    }

    /// Which of `keys` have blocks.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        match self.call(&Request::Exists {
            keys: keys.to_vec(),
        })? {
            Response::Flags(flags) if flags.len() == keys.len() => Ok(flags),
            _ => Err(unexpected("exists")),
        }
    }

    /// How many leading keys of the chain have blocks.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn prefix_match(&self, keys: &[&[u8]]) -> Result<usize> {
        match self.call(&Request::PrefixMatch {
            keys: keys.to_vec(),
        })? {
            Response::Count(n) if n as usize <= keys.len() => Ok(n as usize),
            _ => Err(unexpected("prefix_match")),
        }
    }

    /// Says that the prefix chain `keys` (head first) is over: its conversation or task has
    /// ended, so nothing will extend it or read it again. The node's prefix-aware eviction then
    /// lets the chain's blocks go first, up to a head other chains share (see the engine's
    /// `end_chain`). Returns whether the node held a block of the chain.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn end_chain(&self, keys: &[&[u8]]) -> Result<bool> {
        match self.call(&Request::EndChain {
            keys: keys.to_vec(),
        })? {
            Response::Flags(flags) if flags.len() == 1 => Ok(flags[0]),
            _ => Err(unexpected("end_chain")),
        }
    }

    /// Removes blocks; says which existed. On a node with a data directory the removals
    /// become durable with its next commit (a flush, a write-through put, a demotion, a clean
    /// stop): a crash before that brings the blocks back. [`remove_durable`](Self::remove_durable)
    /// waits for them to be committed.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn remove(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        self.remove_with(keys, false)
    }

    /// [`remove`](Self::remove), answered once the removals are committed to the node's data
    /// directory, so that no crash brings the blocks back (on a node without one, the same
    /// as `remove`).
    ///
    /// # Errors
    ///
    /// Connection errors and refusals (the commit's failure among them).
    pub fn remove_durable(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        self.remove_with(keys, true)
    }

    fn remove_with(&self, keys: &[&[u8]], durable: bool) -> Result<Vec<bool>> {
        let response = self.call(&Request::Remove {
            keys: keys.to_vec(),
            durable,
        });
        self.forget(keys.iter().copied());
        match response? {
            Response::Flags(flags) if flags.len() == keys.len() => Ok(flags),
            _ => Err(unexpected("remove")),
        }
    }

    /// Removes every block the node holds (an administrator's reset); returns how many.
    ///
    /// # Errors
    ///
    /// A connection error, or [`ClientError::Refused`].
    pub fn remove_all(&self) -> Result<u64> {
        let response = self.call(&Request::RemoveAll);
        self.descriptors.lock().forget_all();
        match response? {
            Response::Count(removed) => Ok(removed),
            _ => Err(unexpected("remove_all")),
        }
    }

    /// The node's figures.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn stats(&self) -> Result<NodeStats> {
        match self.call(&Request::Stats)? {
            Response::Stats(stats) => Ok(stats),
            _ => Err(unexpected("stats")),
        }
    }

    /// Whether the node serves.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn health(&self) -> Result<bool> {
        match self.call(&Request::Health)? {
            Response::Health { serving } => Ok(serving),
            _ => Err(unexpected("health")),
        }
    }
}

fn unexpected(what: &str) -> ClientError {
    ClientError::Protocol(FrameError::Malformed(format!(
        "the node's answer does not fit a {what} request"
    )))
}

fn open_control(addr: SocketAddr, config: &ClientConfig) -> Result<(Control, HelloReply)> {
    let stream =
        TcpStream::connect_timeout(&addr, config.timeout).map_err(io("connect to the node"))?;
    stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(config.timeout))
        .map_err(io("set a read timeout"))?;
    stream
        .set_write_timeout(Some(config.timeout))
        .map_err(io("set a write timeout"))?;
    let reader = BufReader::with_capacity(
        CONTROL_BUFFER,
        stream.try_clone().map_err(io("clone a socket"))?,
    );
    let mut control = Control {
        stream,
        reader,
        body: Vec::new(),
    };
    let token = config.token.as_deref().unwrap_or_default();
    let body = encode_body(&Request::Hello { token });
    match exchange(&mut control, 0, &body, &[])? {
        Response::Hello(hello) => Ok((control, hello)),
        Response::Error(reply) => Err(ClientError::Refused(reply)),
        _ => Err(unexpected("hello")),
    }
}

/// Sends a frame (and the bytes that follow it, `trailer`), then reads the response.
fn exchange(control: &mut Control, id: u64, body: &[u8], trailer: &[&[u8]]) -> Result<Response> {
    // Header and body are small (values travel in the trailer): one write.
    let frame = crate::proto::encode_frame(id, body).map_err(io("encode a request"))?;
    control
        .stream
        .write_all(&frame)
        .map_err(io("send a request"))?;
    for bytes in trailer {
        control
            .stream
            .write_all(bytes)
            .map_err(io("send a value"))?;
    }
    let header = match read_frame(&mut control.reader, &mut control.body) {
        Ok(Some(header)) => header,
        Ok(None) => {
            return Err(ClientError::Io {
                action: "read a response",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Err(ReadFrameError::Io(source)) => {
            return Err(ClientError::Io {
                action: "read a response",
                source,
            });
        }
        Err(ReadFrameError::Frame(e)) => return Err(e.into()),
    };
    let response = decode_response(&control.body)?;
    // A node that refuses a frame it could not read answers with request id 0.
    if header.request_id != id && !matches!(response, Response::Error(_)) {
        return Err(FrameError::Malformed(format!(
            "response to request {} where {id} was due",
            header.request_id
        ))
        .into());
    }
    Ok(response)
}
