//! The node's control protocol: length-prefixed, versioned, checksummed frames with a bincode
//! body. Every frame is untrusted input: the header is checked field by field, the body
//! length is bounded before anything is allocated, and the body decodes under a byte limit
//! (bincode refuses a length prefix larger than what is left), so a frame yields a message or
//! a [`FrameError`], never a panic. Layout in `docs/format.md`.
//!
//! Requests borrow their keys from the received body. Block bytes travel outside the body,
//! right after the frame: a put's values (received straight into the space reserved for each
//! block) and an inline lookup's blocks (sent straight from DRAM, received straight into the
//! reader's buffer).

use std::io::{Read, Write};

use bincode::{BorrowDecode, Decode, Encode};
use mooncake_kv_format::le;

/// Request kinds, in the order of [`NodeStats::requests`] and of the node's metrics.
pub const REQUEST_KINDS: [&str; 12] = [
    "put",
    "lookup",
    "exists",
    "prefix_match",
    "remove",
    "stats",
    "health",
    "reserve",
    "commit",
    "end_chain",
    "remove_all",
    "report_corrupt",
];

/// Keys of cached reads a client reports with one lookup at most; reads beyond are counted,
/// not named.
pub const MAX_CACHED_KEYS: usize = 1024;

/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 32;
/// Version of the protocol.
pub const PROTOCOL_VERSION: u16 = 8;
/// Largest body: a largest value plus room for its key and the encoding.
pub const MAX_BODY_BYTES: usize = mooncake_kv_format::MAX_VALUE_BYTES + (1 << 20);
/// Largest body a node reads before a connection has authenticated: a `Hello` with a token
/// of up to 4,000 bytes fits.
pub const MAX_HELLO_BODY_BYTES: usize = 4096;
const MAGIC: [u8; 4] = *b"MKCP";

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Not a frame of this protocol.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    /// Reserved bytes are not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
    /// The header's CRC does not match.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// The body's CRC does not match.
    #[error("frame body checksum mismatch")]
    BodyChecksum,
    /// The body is longer than the reader takes: [`MAX_BODY_BYTES`], or
    /// [`MAX_HELLO_BODY_BYTES`] before a connection has authenticated.
    #[error("frame body of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The length the header claims.
        len: u64,
        /// The most the reader takes here.
        limit: u64,
    },
    /// The body does not decode as the message expected.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// A frame header: which request, how long the body, its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Chosen by the client, echoed in the response.
    pub request_id: u64,
    /// Bytes of the body that follows.
    pub body_len: u32,
    /// CRC32 of the body.
    pub body_crc32: u32,
}

impl FrameHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut b = [0u8; FRAME_HEADER_BYTES];
        b[..4].copy_from_slice(&MAGIC);
        le::put_u16(&mut b, 4, PROTOCOL_VERSION);
        le::put_u64(&mut b, 8, self.request_id);
        le::put_u32(&mut b, 16, self.body_len);
        le::put_u32(&mut b, 20, self.body_crc32);
        let crc = crc32fast::hash(&b[..28]);
        le::put_u32(&mut b, 28, crc);
        b
    }

    /// Decodes and checks a header.
    ///
    /// # Errors
    ///
    /// The first check that failed.
    pub fn decode(b: &[u8; FRAME_HEADER_BYTES]) -> Result<Self, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if le::u32_at(b, 28) != crc32fast::hash(&b[..28]) {
            return Err(FrameError::HeaderChecksum);
        }
        let version = le::u16_at(b, 4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        if b[6..8].iter().chain(&b[24..28]).any(|&x| x != 0) {
            return Err(FrameError::Reserved);
        }
        let body_len = le::u32_at(b, 16);
        if body_len as usize > MAX_BODY_BYTES {
            return Err(FrameError::TooLarge {
                len: body_len.into(),
                limit: MAX_BODY_BYTES as u64,
            });
        }
        Ok(Self {
            request_id: le::u64_at(b, 8),
            body_len,
            body_crc32: le::u32_at(b, 20),
        })
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_BODY_BYTES>()
}

/// Encodes `message` as a frame body.
pub fn encode_body<T: Encode>(message: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these types (no I/O, no limit on writes).
    bincode::encode_to_vec(message, config()).unwrap_or_default()
}

/// Decodes a request borrowing from `body`.
///
/// # Errors
///
/// [`FrameError::Malformed`] for any body that is not exactly one request.
pub fn decode_request(body: &[u8]) -> Result<Request<'_>, FrameError> {
    let (request, used): (Request<'_>, usize) =
        bincode::borrow_decode_from_slice(body, config())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(request)
}

/// Decodes a response.
///
/// # Errors
///
/// [`FrameError::Malformed`] for any body that is not exactly one response.
pub fn decode_response(body: &[u8]) -> Result<Response, FrameError> {
    let (response, used): (Response, usize) = bincode::decode_from_slice(body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            body.len() - used
        )));
    }
    Ok(response)
}

/// Writes one frame.
///
/// # Errors
///
/// The stream's.
pub fn write_frame(out: &mut impl Write, request_id: u64, body: &[u8]) -> std::io::Result<()> {
    out.write_all(&frame_header(request_id, body)?)?;
    out.write_all(body)
}

/// A whole frame in one buffer, for one write to a socket: the segment that carries it then
/// holds all of it, so a node's event loop finds a request (a Hello, say) whole, not its
/// header alone.
///
/// # Errors
///
/// `InvalidInput` for a body longer than a frame can say.
pub fn encode_frame(request_id: u64, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    write_frame(&mut frame, request_id, body)?;
    Ok(frame)
}

/// The encoded header of a frame carrying `body`.
///
/// # Errors
///
/// `InvalidInput` for a body longer than a frame can say.
pub fn frame_header(request_id: u64, body: &[u8]) -> std::io::Result<[u8; FRAME_HEADER_BYTES]> {
    let header = FrameHeader {
        request_id,
        body_len: u32::try_from(body.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        body_crc32: crc32fast::hash(body),
    };
    Ok(header.encode())
}

/// What reading a frame can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The stream failed or ended.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a frame.
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Reads one frame into `body` (resized to the body's length, which the header bounds).
/// `Ok(None)` when the stream ends cleanly before a frame starts.
///
/// # Errors
///
/// I/O errors, and frames that fail their checks.
pub fn read_frame(
    input: &mut impl Read,
    body: &mut Vec<u8>,
) -> Result<Option<FrameHeader>, ReadFrameError> {
    read_frame_within(input, body, MAX_BODY_BYTES)
}

/// As [`read_frame`], refusing a body longer than `limit` bytes as soon as the header says
/// so ([`FrameError::TooLarge`]): a node reads a connection's frames before `Hello` within
/// [`MAX_HELLO_BODY_BYTES`], so a peer that has not authenticated cannot make it hold more.
///
/// # Errors
///
/// As [`read_frame`].
pub fn read_frame_within(
    input: &mut impl Read,
    body: &mut Vec<u8>,
    limit: usize,
) -> Result<Option<FrameHeader>, ReadFrameError> {
    let mut raw = [0u8; FRAME_HEADER_BYTES];
    let mut filled = 0;
    while filled < raw.len() {
        match input.read(&mut raw[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = FrameHeader::decode(&raw)?;
    if header.body_len as usize > limit {
        return Err(FrameError::TooLarge {
            len: header.body_len.into(),
            limit: limit as u64,
        }
        .into());
    }
    // Grow the buffer with the bytes that arrive, not with what the header claims: a peer
    // announcing 64 MiB and sending nothing costs nothing.
    body.clear();
    let len = header.body_len as usize;
    if input.take(len as u64).read_to_end(body)? < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    if crc32fast::hash(body) != header.body_crc32 {
        return Err(FrameError::BodyChecksum.into());
    }
    Ok(Some(header))
}

/// How the blocks of a [`Request::Put`] form a prefix chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, BorrowDecode)]
pub struct ChainLinks<'a> {
    /// The key of the block before the first one, if the chain continues one the node may
    /// hold.
    pub parent: Option<&'a [u8]>,
    /// The last block holds fewer tokens than a full block (`ChainEnd::Partial`).
    pub partial_end: bool,
}

/// A request to a node.
#[derive(Debug, Clone, PartialEq, Eq, Encode, BorrowDecode)]
pub enum Request<'a> {
    /// First request of a connection: the token (empty when the node has none) and the
    /// protocol version the client speaks.
    Hello {
        /// The shared secret, if the node requires one.
        token: &'a [u8],
    },
    /// Store blocks. Each value's bytes follow the frame, in order, outside the body: the node
    /// receives them straight into the space it reserved for the block (no copy in between).
    Put {
        /// Key and value length of each block.
        items: Vec<(&'a [u8], u32)>,
        /// Make each block durable before answering (write-through).
        durable: bool,
        /// The blocks are one prefix chain, in order: each follows the one before it (hints
        /// for eviction, as the engine's `put_chain_with`).
        chain: Option<ChainLinks<'a>>,
    },
    /// The first half of a two-phase put: room for a block of `len` payload bytes under
    /// `key`, invisible until committed, reclaimed if not committed in time.
    Reserve {
        /// The key.
        key: &'a [u8],
        /// Bytes of the payload.
        len: u32,
    },
    /// The second half: makes a reserved block visible. The payload either travels here (over
    /// tcp: copied once, into the reserved space) or was written one-sidedly into the
    /// reserved region range by a transport that can write.
    Commit {
        /// From the `Reserved` answer.
        reservation: u64,
        /// The payload, when it travels with the request.
        payload: Option<&'a [u8]>,
        /// Make the block durable before answering (write-through).
        durable: bool,
    },
    /// Gives a reservation back at once.
    Abort {
        /// From the `Reserved` answer.
        reservation: u64,
    },
    /// Where to read blocks one-sidedly, with a lease on each; also ends the leases the
    /// client is done with (it has read those blocks), so they need not wait to expire.
    Lookup {
        /// The keys.
        keys: Vec<&'a [u8]>,
        /// Leases to end now.
        release: Vec<u64>,
        /// Reads this client found stale (failed verification: the slot was reused or the
        /// block moved) and looked up again since its previous lookup: the node counts them,
        /// since it cannot see them itself.
        stale_reads: u32,
        /// Reads this client served from cached descriptors, with no lookup, since its
        /// previous lookup: the node counts them, since it cannot see them either.
        cached_reads: u32,
        /// The keys of those reads (the first [`MAX_CACHED_KEYS`] of them): the node counts
        /// each as a use for eviction, as it would have counted the lookup, so a block read
        /// often through a cached descriptor does not look cold to it.
        cached_keys: Vec<&'a [u8]>,
        /// Send each block found right after the response body (in order, `block_len` bytes
        /// each) instead of leasing it for a one-sided read: one round trip instead of two,
        /// for clients that read over tcp anyway. The client verifies the bytes the same way.
        inline: bool,
    },
    /// Which keys have blocks.
    Exists {
        /// The keys.
        keys: Vec<&'a [u8]>,
    },
    /// How many leading keys of a chain have blocks.
    PrefixMatch {
        /// The chain.
        keys: Vec<&'a [u8]>,
    },
    /// Remove blocks.
    Remove {
        /// The keys.
        keys: Vec<&'a [u8]>,
        /// Answer once the removals are committed to the node's data directory (a crash no
        /// longer brings the blocks back); without, they are committed with the node's next
        /// commit (a flush, a write-through put, a demotion, a clean stop).
        durable: bool,
    },
    /// Counters and tier usage.
    Stats,
    /// Whether the node serves.
    Health,
    /// The prefix chain `keys` (head first) is over: nothing will extend it or read it again.
    /// A hint for eviction, as the engine's `end_chain`.
    EndChain {
        /// The chain.
        keys: Vec<&'a [u8]>,
    },
    /// Remove every block the node holds (an administrator's reset: what Mooncake's
    /// `remove_all` does). Answered with `Count`, the blocks removed.
    RemoveAll,
    /// The block of `key` and `generation` failed a client's verification the same way on
    /// two reads in a row: the node checks the block itself and, if it is damaged, drops it.
    /// Answered with one flag, whether it dropped it.
    ReportCorrupt {
        /// The block's key.
        key: &'a [u8],
        /// Its generation, as the lookup described it.
        generation: u64,
    },
}

/// Why a node refused a request or one item of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum ErrorCode {
    /// The request is malformed or not allowed now (e.g. no `Hello` first).
    BadRequest,
    /// Missing or wrong token.
    Unauthorized,
    /// A key or value over the limits.
    TooLarge,
    /// No room, even after eviction.
    NoSpace,
    /// The node is shutting down.
    ShuttingDown,
    /// Anything else; the message says what.
    Internal,
    /// The node serves as many connections as it takes; another may succeed later.
    Busy,
    /// The block failed the node's own check (its bytes are damaged): the node dropped it.
    Corrupt,
}

/// A refusal: a code for programs, a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ErrorReply {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// What happened, in words.
    pub message: String,
}

/// What a client needs to read a node's blocks.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct HelloReply {
    /// The node's id: stable across restarts with a data directory, fresh at each start
    /// without one.
    pub node_id: [u8; 16],
    /// The tcp data plane's address.
    pub data_addr: String,
    /// The shared-memory socket's path, for clients on the same host.
    pub shm_path: Option<String>,
    /// The registered DRAM region: id, length, remote key.
    pub region_id: u64,
    /// Length of the region.
    pub region_len: u64,
    /// Key of the region.
    pub remote_key: u64,
    /// How long a lookup's lease lasts, in milliseconds.
    pub lease_ms: u32,
}

/// Where a reserved block's payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ReservedReply {
    /// Names the reservation in `Commit` and `Abort`.
    pub reservation: u64,
    /// The region the payload goes into.
    pub region_id: u64,
    /// Offset of the payload in the region.
    pub offset: u64,
    /// Bytes of the payload.
    pub len: u32,
    /// The reservation is reclaimed this many milliseconds after this answer unless committed.
    pub expires_ms: u32,
}

/// Where a block lies, for a one-sided read, and what it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Descriptor {
    /// The region.
    pub region_id: u64,
    /// The region's remote key.
    pub remote_key: u64,
    /// Offset of the block (its header) in the region.
    pub offset: u64,
    /// Bytes of the whole block.
    pub block_len: u64,
    /// Offset of the payload in the block.
    pub payload_offset: u32,
    /// Bytes of the payload.
    pub payload_len: u32,
    /// The block's generation: what the header read must carry.
    pub generation: u64,
    /// The lease ends this many milliseconds after the lookup was answered (0: no lease).
    pub lease_ms: u32,
    /// Names the lease, to end it early in a later lookup (0: no lease).
    pub lease_id: u64,
}

/// The answer to one item of a request.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Outcome<T> {
    /// Done.
    Ok(T),
    /// Refused.
    Err(ErrorReply),
}

/// One tier's figures, as `stats` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TierFigures {
    /// Which tier: `hbm`, `dram` or `nvme`.
    pub tier: String,
    /// Blocks with a copy on it.
    pub blocks: u64,
    /// Bytes in allocated extents.
    pub used_bytes: u64,
    /// Bytes it manages.
    pub capacity_bytes: u64,
    /// Reads it served.
    pub hits: u64,
    /// Copies dropped from it to make room (demoted ones included).
    pub evictions: u64,
}

/// Node counters, as `stats` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct NodeStats {
    /// Each tier, fastest first: HBM when present, DRAM, then NVMe when present.
    pub tiers: Vec<TierFigures>,
    /// Requests served, by kind: put, lookup, exists, prefix_match, remove, stats, health,
    /// reserve, commit, end_chain, remove_all, report_corrupt (as [`REQUEST_KINDS`]).
    pub requests: Vec<u64>,
    /// Requests or items refused.
    pub errors: u64,
    /// Leases held now.
    pub leases: u64,
    /// Open control connections that have authenticated.
    pub connections: u64,
    /// How the node admitted connections.
    pub admission: AdmissionFigures,
    /// Repair's figures, when the node takes part in repair.
    pub repair: Option<RepairFigures>,
}

/// How a node admits control connections: each must authenticate (`Hello`, with the token
/// when the node has one) within a deadline, and those that have not yet have a budget of
/// their own, so they never take the place of authenticated ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode)]
pub struct AdmissionFigures {
    /// Connections open now that have not authenticated yet.
    pub unauthenticated: u64,
    /// Connections closed because their budget was full, since the node started: the oldest
    /// of those that had not authenticated, to make room for a new one, or a `Hello` past the
    /// limit of authenticated connections (answered `Busy`).
    pub refused: u64,
    /// Connections closed for not authenticating within the deadline, since the node
    /// started.
    pub hello_timeouts: u64,
}

/// A node's repair figures (see the `repair` module).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode)]
pub struct RepairFigures {
    /// Passes over the node's blocks.
    pub passes: u64,
    /// Blocks copied to replicas that lacked them.
    pub blocks_copied: u64,
    /// Copies that failed (retried at the next pass).
    pub failures: u64,
    /// Replicas found missing by the current or last pass and not yet copied: this node's
    /// count of under-replicated blocks.
    pub under_replicated: u64,
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    /// To `Hello`.
    Hello(HelloReply),
    /// To `Reserve`.
    Reserved(ReservedReply),
    /// To `Put` and `Commit`: each block's generation, or why it was refused.
    Put(Vec<Outcome<u64>>),
    /// To `Lookup`: a descriptor, `None` for a miss, or why not.
    Lookup(Vec<Outcome<Option<Descriptor>>>),
    /// To `Exists` and `Remove`; to `Abort` and `EndChain`, one flag.
    Flags(Vec<bool>),
    /// To `PrefixMatch` and `RemoveAll`.
    Count(u64),
    /// To `Stats`.
    Stats(NodeStats),
    /// To `Health`.
    Health {
        /// Whether the node serves (false while shutting down).
        serving: bool,
    },
    /// The whole request was refused.
    Error(ErrorReply),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip_borrowing_their_bytes() {
        let payload = vec![7u8; 100_000];
        let request = Request::Commit {
            reservation: 3,
            payload: Some(&payload),
            durable: true,
        };
        let body = encode_body(&request);
        let decoded = decode_request(&body).unwrap();
        assert_eq!(decoded, request);
        let Request::Commit {
            payload: Some(borrowed),
            ..
        } = decoded
        else {
            unreachable!()
        };
        let inside = body.as_ptr_range();
        assert!(
            inside.contains(&borrowed.as_ptr()),
            "the payload is not copied"
        );
        for chain in [
            None,
            Some(ChainLinks {
                parent: Some(b"parent".as_slice()),
                partial_end: true,
            }),
        ] {
            let put = Request::Put {
                items: vec![(b"k".as_slice(), 100_000)],
                durable: false,
                chain,
            };
            assert_eq!(decode_request(&encode_body(&put)).unwrap(), put);
        }
        let end = Request::EndChain {
            keys: vec![b"head".as_slice(), b"tail".as_slice()],
        };
        assert_eq!(decode_request(&encode_body(&end)).unwrap(), end);
    }

    #[test]
    fn a_length_prefix_beyond_the_body_is_refused_without_allocating() {
        // Variant 4 (Exists) with a vector length of 2^60: bincode must refuse, not allocate.
        let mut body = vec![4u8];
        body.push(255);
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode_request(&body),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_body_that_never_arrives_costs_what_arrived_not_what_was_claimed() {
        let header = FrameHeader {
            request_id: 1,
            body_len: MAX_BODY_BYTES as u32,
            body_crc32: 0,
        };
        let mut input = header.encode().to_vec();
        input.extend_from_slice(&[7; 100]);
        let mut body = Vec::new();
        let result = read_frame(&mut input.as_slice(), &mut body);
        assert!(matches!(result, Err(ReadFrameError::Io(_))), "{result:?}");
        assert!(body.capacity() < 1 << 20, "{} bytes held", body.capacity());
    }

    #[test]
    fn a_body_over_the_callers_limit_is_refused_from_its_header() {
        let body = vec![7; MAX_HELLO_BODY_BYTES + 1];
        let mut out = Vec::new();
        write_frame(&mut out, 1, &body).unwrap();
        let mut read_body = Vec::new();
        let result = read_frame_within(&mut out.as_slice(), &mut read_body, MAX_HELLO_BODY_BYTES);
        assert!(
            matches!(
                result,
                Err(ReadFrameError::Frame(FrameError::TooLarge { len, limit }))
                    if len == body.len() as u64 && limit == MAX_HELLO_BODY_BYTES as u64
            ),
            "{result:?}"
        );
        assert!(read_body.is_empty(), "nothing of the body was read");
        let header = read_frame(&mut out.as_slice(), &mut read_body)
            .unwrap()
            .unwrap();
        assert_eq!(header.body_len as usize, body.len());
    }

    #[test]
    fn frames_round_trip_and_every_header_bit_flip_is_caught() {
        let mut out = Vec::new();
        let body = encode_body(&Request::Stats);
        write_frame(&mut out, 42, &body).unwrap();
        let mut read_body = Vec::new();
        let header = read_frame(&mut out.as_slice(), &mut read_body)
            .unwrap()
            .unwrap();
        assert_eq!(header.request_id, 42);
        assert_eq!(decode_request(&read_body).unwrap(), Request::Stats);
        let raw: [u8; FRAME_HEADER_BYTES] = out[..FRAME_HEADER_BYTES].try_into().unwrap();
        for bit in 0..FRAME_HEADER_BYTES * 8 {
            let mut bad = raw;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(FrameHeader::decode(&bad).is_err(), "bit {bit}");
        }
        let mut damaged = out.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(matches!(
            read_frame(&mut damaged.as_slice(), &mut read_body),
            Err(ReadFrameError::Frame(FrameError::BodyChecksum))
        ));
        assert!(
            read_frame(&mut [].as_slice(), &mut read_body)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn an_oversize_body_is_refused_from_the_header_alone() {
        let header = FrameHeader {
            request_id: 1,
            body_len: u32::MAX,
            body_crc32: 0,
        };
        assert!(matches!(
            FrameHeader::decode(&header.encode()),
            Err(FrameError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_body_decodes_or_fails_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn responses_round_trip(gens in proptest::collection::vec(any::<u64>(), 0..20), msg in ".{0,40}") {
            let response = Response::Put(
                gens.iter()
                    .map(|&g| if g % 3 == 0 {
                        Outcome::Err(ErrorReply { code: ErrorCode::NoSpace, message: msg.clone() })
                    } else {
                        Outcome::Ok(g)
                    })
                    .collect(),
            );
            prop_assert_eq!(decode_response(&encode_body(&response)).unwrap(), response);
        }
    }
}
