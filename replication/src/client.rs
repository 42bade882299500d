//! The client: control requests to a node, and verified one-sided reads of its blocks.

use std::hash::BuildHasher;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use mooncake_kv_engine::ChainEnd;
use mooncake_kv_engine::format::{self, HEADER_BYTES, MAX_PAYLOAD_OFFSET};
use mooncake_kv_transfer::{
    ReadOp, RemoteSlice, ShmTransport, TcpTransport, Transport, coarse_clock_ns,
};
use parking_lot::Mutex;

use crate::proto::{
    ChainLinks, Descriptor, ErrorReply, FrameError, HelloReply, MAX_CACHED_KEYS, NodeStats,
    Outcome, ReadFrameError, Request, ReservedReply, Response, decode_response, encode_body,
    read_frame, write_frame,
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
        }
    }
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { action, source }
}

/// What an inline read found.
enum Inline {
    Miss,
    /// The payload's length, in the caller's buffer.
    Read(usize),
    Owned(Vec<u8>),
    /// The bytes did not verify.
    Mismatch,
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
    next: AtomicUsize,
    next_request: AtomicU64,
    transport: Box<dyn Transport>,
    transport_name: &'static str,
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

/// Descriptors from recent lookups, each with the time it was asked for (on the coarse clock,
/// [`coarse_clock_ns`]: a TTL holds to within its few milliseconds). Entries are found by
/// a 64-bit hash of the key, not the key itself, and each is one cache line: a read through
/// the cache waits on one memory load before it can fetch the block's header. Two keys with
/// the same hash share an entry; a read through the other key's descriptor fails
/// verification (the block's header names its key) and looks up.
#[derive(Default)]
struct DescriptorCache {
    entries: hashbrown::HashTable<Cached>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Bumped by every put or remove of this client: a lookup that began before one may have
    /// seen the block it replaced, so its descriptor is not kept.
    writes: u64,
}

/// A cached descriptor: everything a read needs but the lease (a cached read holds none).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Cached {
    /// The key's hash: the entry's name in the table.
    slot: u64,
    /// When the lookup that found it was asked for (coarse clock nanoseconds).
    asked: u64,
    region_id: u64,
    remote_key: u64,
    offset: u64,
    block_len: u64,
    generation: u64,
    payload_offset: u32,
    payload_len: u32,
}

const _: () = assert!(std::mem::size_of::<Cached>() == 64);

impl Cached {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            region_id: self.region_id,
            remote_key: self.remote_key,
            offset: self.offset,
            block_len: self.block_len,
            payload_offset: self.payload_offset,
            payload_len: self.payload_len,
            generation: self.generation,
            lease_ms: 0,
            lease_id: 0,
        }
    }
}

/// How long ago `stamp` (coarse clock nanoseconds) was.
fn age(stamp: u64) -> Duration {
    Duration::from_nanos(coarse_clock_ns().saturating_sub(stamp))
}

impl DescriptorCache {
    fn slot(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn get(&mut self, key: &[u8], ttl: Duration) -> Option<Descriptor> {
        let slot = self.slot(key);
        let entry = self.entries.find_entry(slot, |e| e.slot == slot).ok()?;
        if age(entry.get().asked) < ttl {
            return Some(entry.get().descriptor());
        }
        entry.remove();
        None
    }

    /// Keeps `descriptor`, asked for at `asked` (coarse clock nanoseconds) when this cache had
    /// seen `writes` writes.
    fn insert(
        &mut self,
        key: &[u8],
        descriptor: &Descriptor,
        asked: u64,
        writes: u64,
        limit: usize,
        ttl: Duration,
    ) {
        if writes != self.writes || limit == 0 {
            return;
        }
        let slot = self.slot(key);
        let cached = Cached {
            slot,
            asked,
            region_id: descriptor.region_id,
            remote_key: descriptor.remote_key,
            offset: descriptor.offset,
            block_len: descriptor.block_len,
            generation: descriptor.generation,
            payload_offset: descriptor.payload_offset,
            payload_len: descriptor.payload_len,
        };
        if let Ok(mut entry) = self.entries.find_entry(slot, |e| e.slot == slot) {
            *entry.get_mut() = cached;
            return;
        }
        if self.entries.len() >= limit {
            self.entries.retain(|e| age(e.asked) < ttl);
            if self.entries.len() >= limit {
                self.entries.clear();
            }
        }
        self.entries.insert_unique(slot, cached, |e| e.slot);
    }

    fn remove(&mut self, key: &[u8]) {
        let slot = self.slot(key);
        if let Ok(entry) = self.entries.find_entry(slot, |e| e.slot == slot) {
            entry.remove();
        }
    }

    fn forget<'a>(&mut self, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.writes += 1;
        for key in keys {
            self.remove(key);
        }
    }

    fn forget_all(&mut self) {
        self.writes += 1;
        self.entries.clear();
    }
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
        let shm_path = hello
            .shm_path
            .as_deref()
            .filter(|_| addr.ip().is_loopback())
            .filter(|p| Path::new(p).exists());
        let connections = config.connections.max(1);
        let (transport, transport_name): (Box<dyn Transport>, &'static str) =
            match (config.transport, shm_path) {
                (TransportChoice::Shm, None) => {
                    return Err(ClientError::Transfer(mooncake_kv_transfer::Error::Io {
                        action: "use shared memory (the node offers none to this host)",
                        source: std::io::ErrorKind::Unsupported.into(),
                    }));
                }
                (TransportChoice::Shm | TransportChoice::Auto, Some(path)) => {
                    match ShmTransport::connect(path) {
                        Ok(t) => (Box::new(t), "shm"),
                        Err(error) if config.transport == TransportChoice::Auto => {
                            tracing::info!(%error, "shared memory unavailable; using tcp");
                            (
                                Box::new(TcpTransport::new(
                                    data_addr,
                                    connections,
                                    config.timeout,
                                )?),
                                "tcp",
                            )
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
                _ => (
                    Box::new(TcpTransport::new(data_addr, connections, config.timeout)?),
                    "tcp",
                ),
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

    /// The data path in use: `"shm"` or `"tcp"`.
    pub fn transport_name(&self) -> &'static str {
        self.transport_name
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

    /// What to hand [`remember`](Self::remember) after a lookup that starts now.
    fn lookup_started(&self) -> (u64, u64) {
        (coarse_clock_ns(), self.descriptors.lock().writes)
    }

    /// Keeps the descriptor of a block just read and verified.
    fn remember(&self, key: &[u8], d: &Descriptor, (asked, writes): (u64, u64)) {
        if self.caching() {
            let (limit, ttl) = (
                self.config.descriptor_cache_entries,
                self.config.descriptor_ttl,
            );
            self.descriptors
                .lock()
                .insert(key, d, asked, writes, limit, ttl);
        }
    }

    /// Drops the descriptors of keys this client is writing or removing.
    fn forget<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.descriptors.lock().forget(keys);
    }

    /// The cached descriptor of `key`, if one is fresh.
    fn cached(&self, key: &[u8]) -> Option<Descriptor> {
        if !self.caching() {
            return None;
        }
        self.descriptors.lock().get(key, self.config.descriptor_ttl)
    }

    /// A read through the cached descriptor `d` of `key`: `Some(len)` when it verified;
    /// `None` when it did not (the descriptor is dropped, and the caller looks up).
    fn read_cached(&self, key: &[u8], d: &Descriptor, dst: &mut [u8]) -> Option<usize> {
        let len = d.payload_len as usize;
        let verified =
            dst.len() >= len && matches!(self.read_verified(key, d, &mut dst[..len]), Ok(true));
        if verified {
            self.cached_reads.fetch_add(1, Ordering::Relaxed);
            // Checked without the lock first: a reader that has not looked up for a while has
            // a full list, and its reads should not queue on it.
            if self.unreported_cached_key_count.load(Ordering::Relaxed) < MAX_CACHED_KEYS {
                let mut keys = self.unreported_cached_keys.lock();
                if keys.len() < MAX_CACHED_KEYS {
                    keys.push(key.to_vec());
                    self.unreported_cached_key_count
                        .store(keys.len(), Ordering::Relaxed);
                }
            }
            return Some(len);
        }
        self.descriptors.lock().remove(key);
        None
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
        // The first idle connection from a rotating start; wait only when all are busy.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.pool.len();
        let mut slot = (0..n)
            .find_map(|i| self.pool[(start + i) % n].try_lock())
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

    /// Whether reads take the inline path (see [`ClientConfig::inline_tcp_reads`]).
    fn inline(&self) -> bool {
        self.transport_name == "tcp" && self.config.inline_tcp_reads
    }

    /// One lookup with the block inline: the header and key into a small buffer, the payload
    /// straight into `dst` (or a new buffer when `dst` is `None`), then verification.
    fn read_inline(&self, key: &[u8], mut dst: Option<&mut [u8]>) -> Result<Inline> {
        let release = std::mem::take(&mut *self.done_leases.lock());
        let cached_keys = self.take_cached_keys();
        let request = Request::Lookup {
            keys: vec![key],
            release,
            stale_reads: self.take_unreported_stale(),
            cached_reads: self.take_unreported_cached(),
            cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
            inline: true,
        };
        self.call_then(&request, &[], |control, response| {
            let Response::Lookup(mut outcomes) = response else {
                return Err(unexpected("lookup"));
            };
            let d = match (outcomes.pop(), outcomes.is_empty()) {
                (Some(Outcome::Ok(Some(d))), true) => d,
                (Some(Outcome::Ok(None)), true) => return Ok(Inline::Miss),
                (Some(Outcome::Err(e)), true) => return Err(ClientError::Refused(e)),
                _ => return Err(unexpected("lookup")),
            };
            check_descriptor(&d)?;
            let len = d.payload_len as usize;
            let mut head = vec![0u8; d.payload_offset as usize];
            let reader = &mut control.reader;
            reader
                .read_exact(&mut head)
                .map_err(io("read a block header"))?;
            let mut owned = Vec::new();
            let payload: &mut [u8] = match dst.as_deref_mut() {
                Some(buf) if buf.len() >= len => &mut buf[..len],
                Some(buf) => {
                    // Keep the stream in step, then say why.
                    std::io::copy(&mut reader.take(len as u64), &mut std::io::sink())
                        .map_err(io("skip a block"))?;
                    return Err(ClientError::BufferTooSmall {
                        needed: len,
                        available: buf.len(),
                    });
                }
                None => {
                    owned = vec![0u8; len];
                    &mut owned
                }
            };
            // Checksummed piece by piece as it arrives, while each piece is in cache.
            let mut crc = crc32fast::Hasher::new();
            for piece in payload.chunks_mut(RECEIVE_CHUNK) {
                reader
                    .read_exact(piece)
                    .map_err(io("read a block payload"))?;
                crc.update(piece);
            }
            if !verify_with_crc(key, &d, &head, crc.finalize()) {
                return Ok(Inline::Mismatch);
            }
            Ok(if dst.is_some() {
                Inline::Read(len)
            } else {
                Inline::Owned(owned)
            })
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
        let limit = mooncake_kv_engine::MAX_VALUE_BYTES;
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

    fn lookup(&self, key: &[u8]) -> Result<Option<Descriptor>> {
        let release = std::mem::take(&mut *self.done_leases.lock());
        let cached_keys = self.take_cached_keys();
        let Response::Lookup(mut outcomes) = self.call(&Request::Lookup {
            keys: vec![key],
            release,
            stale_reads: self.take_unreported_stale(),
            cached_reads: self.take_unreported_cached(),
            cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
            inline: false,
        })?
        else {
            return Err(unexpected("lookup"));
        };
        match (outcomes.pop(), outcomes.is_empty()) {
            (Some(Outcome::Ok(d)), true) => Ok(d),
            (Some(Outcome::Err(e)), true) => Err(ClientError::Refused(e)),
            _ => Err(unexpected("lookup")),
        }
    }

    /// The value of `key`, or `None` on a miss.
    ///
    /// # Errors
    ///
    /// As [`get_into`](Self::get_into).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(d) = self.cached(key) {
            let mut value = vec![0u8; d.payload_len as usize];
            if self.read_cached(key, &d, &mut value).is_some() {
                return Ok(Some(value));
            }
        }
        for _ in 0..self.config.max_attempts {
            if self.inline() {
                match self.read_inline(key, None)? {
                    Inline::Miss => return Ok(None),
                    Inline::Owned(value) => return Ok(Some(value)),
                    Inline::Read(_) | Inline::Mismatch => {
                        self.count_stale_read();
                        continue;
                    }
                }
            }
            let started = self.lookup_started();
            let Some(d) = self.lookup(key)? else {
                return Ok(None);
            };
            check_descriptor(&d)?;
            let mut value = vec![0u8; d.payload_len as usize];
            if self.read_verified(key, &d, &mut value)? {
                self.remember(key, &d, started);
                return Ok(Some(value));
            }
        }
        Err(ClientError::Stale {
            attempts: self.config.max_attempts,
        })
    }

    /// Reads the value of `key` straight into `dst` (one-sided, then verified); returns its
    /// length, or `None` on a miss. Bytes of `dst` past the value are left alone.
    ///
    /// # Errors
    ///
    /// [`ClientError::BufferTooSmall`]; [`ClientError::Stale`] if the block changed under
    /// every attempt; [`ClientError::Transfer`] if the read was refused; connection errors.
    pub fn get_into(&self, key: &[u8], dst: &mut [u8]) -> Result<Option<usize>> {
        if let Some(d) = self.cached(key) {
            if let Some(len) = self.read_cached(key, &d, dst) {
                return Ok(Some(len));
            }
        }
        for _ in 0..self.config.max_attempts {
            if self.inline() {
                match self.read_inline(key, Some(dst))? {
                    Inline::Miss => return Ok(None),
                    Inline::Read(len) => return Ok(Some(len)),
                    Inline::Owned(_) | Inline::Mismatch => {
                        self.count_stale_read();
                        continue;
                    }
                }
            }
            let started = self.lookup_started();
            let Some(d) = self.lookup(key)? else {
                return Ok(None);
            };
            check_descriptor(&d)?;
            let len = d.payload_len as usize;
            if dst.len() < len {
                return Err(ClientError::BufferTooSmall {
                    needed: len,
                    available: dst.len(),
                });
            }
            if self.read_verified(key, &d, &mut dst[..len])? {
                self.remember(key, &d, started);
                return Ok(Some(len));
            }
        }
        Err(ClientError::Stale {
            attempts: self.config.max_attempts,
        })
    }

    /// Reads the block `d` describes: its header and key into a small buffer, its payload
    /// straight into `payload`; then checks both against the descriptor and the key.
    /// `Ok(false)` when they do not match (the slot was reused or the block moved).
    fn read_verified(&self, key: &[u8], d: &Descriptor, payload: &mut [u8]) -> Result<bool> {
        if self.in_place() {
            return self.read_in_place(key, d, payload);
        }
        let mut head = vec![0u8; d.payload_offset as usize];
        let mut ops = block_reads(d, &mut head, payload);
        let results = self.transport.read_batch_crc32(&mut ops);
        if d.lease_id != 0 {
            self.done_leases.lock().push(d.lease_id);
        }
        let mut crcs = [0u32; 2];
        for (crc, result) in crcs.iter_mut().zip(results) {
            *crc = result?;
        }
        if verify_with_crc(key, d, ops[0].dst, crcs[1]) {
            Ok(true)
        } else {
            self.count_stale_read();
            Ok(false)
        }
    }

    /// [`read_verified`](Self::read_verified) over shared memory, without a payload CRC: the
    /// payload is copied, then the header and key are read and checked (see
    /// [`Transport::read_in_place`]). The node zeroes a block's header before any of its bytes
    /// can be reused, so a copy that caught bytes of a later block, or of none, is refused.
    fn read_in_place(&self, key: &[u8], d: &Descriptor, payload: &mut [u8]) -> Result<bool> {
        // Most heads (header, a short key, padding) fit on the stack; check_descriptor bounds
        // the rest.
        let mut small = [0u8; 256];
        let mut large = Vec::new();
        let len = d.payload_offset as usize;
        let head = if len <= small.len() {
            &mut small[..len]
        } else {
            large.resize(len, 0);
            &mut large[..]
        };
        let block = RemoteSlice {
            region_id: d.region_id,
            offset: d.offset,
            remote_key: d.remote_key,
        };
        let read = self.transport.read_in_place(
            block,
            head,
            u64::from(d.payload_offset),
            payload,
            &|head| verify_head(key, d, head).is_some(),
        );
        if d.lease_id != 0 {
            self.done_leases.lock().push(d.lease_id);
        }
        let verified = read?;
        if !verified {
            self.count_stale_read();
        }
        Ok(verified)
    }

    /// [`get_into`](Self::get_into) for many keys: one lookup for all of them, then all the
    /// one-sided reads in one batch. A block that fails verification is read again on its
    /// own. One result per item, in order. (Over tcp with inline reads, the items are read one
    /// after another.)
    pub fn get_into_batch(&self, items: &mut [(&[u8], &mut [u8])]) -> Vec<Result<Option<usize>>> {
        if self.inline() || items.len() <= 1 {
            return items
                .iter_mut()
                .map(|(key, dst)| self.get_into(key, dst))
                .collect();
        }
        // Keys with fresh descriptors are read first, with no lookup.
        let keys: Vec<&[u8]> = items.iter().map(|(key, _)| *key).collect();
        let mut results: Vec<Option<Result<Option<usize>>>> = keys.iter().map(|_| None).collect();
        for ((key, dst), result) in items.iter_mut().zip(&mut results) {
            if let Some(d) = self.cached(key) {
                *result = self.read_cached(key, &d, dst).map(|len| Ok(Some(len)));
            }
        }
        let pending: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_none()).collect();
        let started = self.lookup_started();
        let outcomes = if pending.is_empty() {
            // No lookup to send: what it would carry (leases to end, cached reads to report)
            // waits for the next one.
            Vec::new()
        } else {
            let release = std::mem::take(&mut *self.done_leases.lock());
            let cached_keys = self.take_cached_keys();
            match self.call(&Request::Lookup {
                keys: pending.iter().map(|&i| keys[i]).collect(),
                release,
                stale_reads: self.take_unreported_stale(),
                cached_reads: self.take_unreported_cached(),
                cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
                inline: false,
            }) {
                Ok(Response::Lookup(outcomes)) if outcomes.len() == pending.len() => outcomes,
                // The batch as a whole failed: each item says why on its own.
                _ => {
                    for &i in &pending {
                        let (key, dst) = &mut items[i];
                        results[i] = Some(self.get_into(key, dst));
                    }
                    Vec::new()
                }
            }
        };
        let mut planned: Vec<(usize, Descriptor)> = Vec::new();
        for (&i, outcome) in pending.iter().zip(outcomes) {
            match outcome {
                Outcome::Err(reply) => results[i] = Some(Err(ClientError::Refused(reply))),
                Outcome::Ok(None) => results[i] = Some(Ok(None)),
                Outcome::Ok(Some(d)) => {
                    if let Err(error) = check_descriptor(&d) {
                        results[i] = Some(Err(error));
                    } else if items[i].1.len() < d.payload_len as usize {
                        results[i] = Some(Err(ClientError::BufferTooSmall {
                            needed: d.payload_len as usize,
                            available: items[i].1.len(),
                        }));
                    } else {
                        planned.push((i, d));
                    }
                }
            }
        }
        let mut retry = Vec::new();
        if self.in_place() {
            // Copies out of shared memory: nothing to gain from one batch.
            for (i, d) in &planned {
                let (key, dst) = &mut items[*i];
                let len = d.payload_len as usize;
                results[*i] = Some(match self.read_in_place(key, d, &mut dst[..len]) {
                    Ok(true) => {
                        self.remember(key, d, started);
                        Ok(Some(len))
                    }
                    Ok(false) => {
                        retry.push(*i);
                        continue;
                    }
                    Err(error) => Err(error),
                });
            }
        } else {
            let mut heads: Vec<Vec<u8>> = planned
                .iter()
                .map(|(_, d)| vec![0u8; d.payload_offset as usize])
                .collect();
            // The planned items' buffers, in order (indexes in `planned` increase).
            let mut next = planned.iter().peekable();
            let mut payloads: Vec<&mut [u8]> = Vec::with_capacity(planned.len());
            for (i, (_, dst)) in items.iter_mut().enumerate() {
                if let Some((_, d)) = next.next_if(|(j, _)| *j == i) {
                    payloads.push(&mut dst[..d.payload_len as usize]);
                }
            }
            let mut ops: Vec<ReadOp<'_>> = Vec::with_capacity(planned.len() * 2);
            for (((_, d), head), payload) in planned.iter().zip(&mut heads).zip(payloads) {
                ops.extend(block_reads(d, head, payload));
            }
            let mut crcs = self.transport.read_batch_crc32(&mut ops).into_iter();
            self.done_leases.lock().extend(
                planned
                    .iter()
                    .map(|(_, d)| d.lease_id)
                    .filter(|&id| id != 0),
            );
            for (k, (i, d)) in planned.iter().enumerate() {
                let (Some(head_read), Some(payload_read)) = (crcs.next(), crcs.next()) else {
                    break;
                };
                results[*i] = Some(match (head_read, payload_read) {
                    (Err(e), _) | (_, Err(e)) => Err(e.into()),
                    (Ok(_), Ok(crc)) if verify_with_crc(keys[*i], d, ops[2 * k].dst, crc) => {
                        self.remember(keys[*i], d, started);
                        Ok(Some(d.payload_len as usize))
                    }
                    (Ok(_), Ok(_)) => {
                        self.count_stale_read();
                        retry.push(*i);
                        continue;
                    }
                });
            }
        }
        for i in retry {
            let (key, dst) = &mut items[i];
            results[i] = Some(self.get_into(key, dst));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(unexpected("lookup"))))
            .collect()
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

    /// Removes blocks; says which existed.
    ///
    /// # Errors
    ///
    /// Connection errors and refusals.
    pub fn remove(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        let response = self.call(&Request::Remove {
            keys: keys.to_vec(),
        });
        self.forget(keys.iter().copied());
        match response? {
            Response::Flags(flags) if flags.len() == keys.len() => Ok(flags),
            _ => Err(unexpected("remove")),
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

/// The two one-sided reads of a block: header, key and padding into `head`, the payload
/// into `payload`.
fn block_reads<'a>(d: &Descriptor, head: &'a mut [u8], payload: &'a mut [u8]) -> [ReadOp<'a>; 2] {
    let at = |offset| RemoteSlice {
        region_id: d.region_id,
        offset,
        remote_key: d.remote_key,
    };
    [
        ReadOp {
            src: at(d.offset),
            dst: head,
        },
        ReadOp {
            src: at(d.offset + u64::from(d.payload_offset)),
            dst: payload,
        },
    ]
}

fn unexpected(what: &str) -> ClientError {
    ClientError::Protocol(FrameError::Malformed(format!(
        "the node's answer does not fit a {what} request"
    )))
}

/// A descriptor is the node's word, but its sizes still bound what this client allocates.
fn check_descriptor(d: &Descriptor) -> Result<()> {
    let plausible = (HEADER_BYTES..=MAX_PAYLOAD_OFFSET + HEADER_BYTES)
        .contains(&(d.payload_offset as usize))
        && d.payload_len as usize <= mooncake_kv_engine::MAX_VALUE_BYTES
        && d.block_len == u64::from(d.payload_offset) + u64::from(d.payload_len);
    if plausible {
        Ok(())
    } else {
        Err(FrameError::Malformed(format!("implausible descriptor {d:?}")).into())
    }
}

/// Whether `head` (header, key, padding) and a payload whose CRC32 is `payload_crc` are the
/// block `d` describes, under `key`, whole.
fn verify_with_crc(key: &[u8], d: &Descriptor, head: &[u8], payload_crc: u32) -> bool {
    verify_head(key, d, head).is_some_and(|header| payload_crc == header.payload_crc32)
}

/// The header of `head` (header, key, padding) when it is whole and is the block `d`
/// describes, under `key`.
fn verify_head(key: &[u8], d: &Descriptor, head: &[u8]) -> Option<format::Header> {
    let header = format::decode_header(head).ok()?;
    let key_end = HEADER_BYTES + key.len();
    let whole = header.generation == d.generation
        && header.payload_len == d.payload_len
        && header.payload_offset == d.payload_offset
        && usize::from(header.key_len) == key.len()
        && head.len() == header.payload_offset as usize
        && head.get(HEADER_BYTES..key_end) == Some(key)
        && crc32fast::hash(key) == header.key_crc32
        && head[key_end..].iter().all(|&b| b == 0);
    whole.then_some(header)
}

/// Bytes received at a time when checksumming a payload as it arrives: small enough to be
/// checksummed while still in cache.
const RECEIVE_CHUNK: usize = 128 << 10;

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
    let mut frame = Vec::with_capacity(crate::proto::FRAME_HEADER_BYTES + body.len());
    write_frame(&mut frame, id, body).map_err(io("encode a request"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(key: &[u8], d: &Descriptor, head: &[u8], payload: &[u8]) -> bool {
        verify_with_crc(key, d, head, crc32fast::hash(payload))
    }

    fn block(key: &[u8], payload: &[u8], generation: u64) -> (Descriptor, Vec<u8>) {
        let len = format::encoded_len(key.len(), payload.len(), 64);
        let mut bytes = vec![0u8; len];
        format::encode_into(&mut bytes, key, payload, generation, 64).unwrap();
        let header = format::decode_header(&bytes).unwrap();
        let d = Descriptor {
            region_id: 1,
            remote_key: 2,
            offset: 0,
            block_len: len as u64,
            payload_offset: header.payload_offset,
            payload_len: header.payload_len,
            generation,
            lease_ms: 0,
            lease_id: 0,
        };
        (d, bytes)
    }

    #[test]
    fn verification_accepts_the_block_and_nothing_else() {
        let (d, bytes) = block(b"key", &[5u8; 3000], 9);
        let split = d.payload_offset as usize;
        let (head, payload) = bytes.split_at(split);
        assert!(verify(b"key", &d, head, payload));
        // Another key, another generation, a torn payload, a torn header.
        assert!(!verify(b"kez", &d, head, payload));
        assert!(!verify(
            b"key",
            &Descriptor {
                generation: 10,
                ..d
            },
            head,
            payload
        ));
        let mut torn = payload.to_vec();
        torn[1234] ^= 1;
        assert!(!verify(b"key", &d, head, &torn));
        let mut bad_head = head.to_vec();
        bad_head[70] ^= 1;
        assert!(!verify(b"key", &d, &bad_head, payload));
        // A reused slot: another block of the same length at the same place.
        let (_, other) = block(b"key", &[6u8; 3000], 11);
        let (other_head, other_payload) = other.split_at(split);
        assert!(!verify(b"key", &d, other_head, other_payload));
        assert!(!verify(b"key", &d, head, other_payload));
    }

    #[test]
    fn implausible_descriptors_are_refused_before_allocating() {
        let (d, _) = block(b"k", b"v", 1);
        assert!(check_descriptor(&d).is_ok());
        let huge = Descriptor {
            payload_len: u32::MAX,
            block_len: u64::from(d.payload_offset) + u64::from(u32::MAX),
            ..d
        };
        assert!(check_descriptor(&huge).is_err());
        assert!(check_descriptor(&Descriptor { block_len: 5, ..d }).is_err());
    }

    #[test]
    fn the_descriptor_cache_keeps_only_what_no_write_may_have_changed() {
        let (d, _) = block(b"k", b"v", 1);
        let ttl = Duration::from_secs(60);
        let limit = 8;
        let mut cache = DescriptorCache::default();
        // A lookup that began before a write of this client is not kept.
        let before = cache.writes;
        cache.forget([b"other".as_slice()]);
        cache.insert(b"k", &d, coarse_clock_ns(), before, limit, ttl);
        assert_eq!(cache.get(b"k", ttl), None);
        // One that began after is, without its lease.
        let leased = Descriptor {
            lease_id: 7,
            lease_ms: 100,
            ..d
        };
        cache.insert(b"k", &leased, coarse_clock_ns(), cache.writes, limit, ttl);
        assert_eq!(cache.get(b"k", ttl), Some(d));
        // A write of the key drops it.
        cache.forget([b"k".as_slice()]);
        assert_eq!(cache.get(b"k", ttl), None);
        // It ages out.
        let long_ago = coarse_clock_ns().saturating_sub(61_000_000_000);
        cache.insert(b"k", &d, long_ago, cache.writes, limit, ttl);
        assert_eq!(cache.get(b"k", ttl), None);
        assert!(cache.entries.is_empty());
        // Never more than the limit.
        for i in 0..100u32 {
            cache.insert(
                &i.to_le_bytes(),
                &d,
                coarse_clock_ns(),
                cache.writes,
                limit,
                ttl,
            );
            assert!(cache.entries.len() <= limit);
        }
        assert_eq!(cache.get(&99u32.to_le_bytes(), ttl), Some(d));
        cache.forget_all();
        assert!(cache.entries.is_empty());
    }
}
