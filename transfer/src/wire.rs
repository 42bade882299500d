//! Frames of the tcp transport and of the shared-memory handshake. Fixed-size, little-endian,
//! each with a magic, a version and a CRC32 of its other bytes. Decoding is total: any bytes
//! give a frame or a [`FrameError`]; nothing is allocated. Layouts are in `docs/format.md`.

/// Bytes of a [`ReadRequest`] on the wire.
pub const REQUEST_BYTES: usize = 48;
/// Bytes of a [`ReadResponse`] header on the wire (the payload follows it).
pub const RESPONSE_BYTES: usize = 32;
/// Bytes of a [`MapRequest`] on the wire.
pub const MAP_REQUEST_BYTES: usize = 32;
/// Bytes of a [`MapResponse`] on the wire.
pub const MAP_RESPONSE_BYTES: usize = 32;
/// Bytes of an [`QpEndpoint`] on the wire (RDMA queue-pair handshake).
pub const ENDPOINT_BYTES: usize = 40;
/// Bytes of an [`RdmaGrant`] on the wire.
pub const GRANT_BYTES: usize = 40;
/// Version of every frame layout.
pub const WIRE_VERSION: u16 = 1;

const REQUEST_MAGIC: [u8; 4] = *b"MKRQ";
const RESPONSE_MAGIC: [u8; 4] = *b"MKRS";
const MAP_REQUEST_MAGIC: [u8; 4] = *b"MKMQ";
const MAP_RESPONSE_MAGIC: [u8; 4] = *b"MKMS";
const ENDPOINT_MAGIC: [u8; 4] = *b"MKEP";
const GRANT_MAGIC: [u8; 4] = *b"MKRG";
const KIND_READ: u16 = 1;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than the frame's fixed size.
    #[error("frame of {len} bytes is shorter than {needed}")]
    Short {
        /// Bytes given.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Not this kind of frame.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A layout version this build does not speak.
    #[error("unsupported wire version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// The CRC does not match.
    #[error("frame checksum mismatch")]
    Checksum,
    /// A field holds a value the layout does not allow.
    #[error("invalid frame field {field} = {value}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A response that does not answer the request it should.
    #[error("response to request {found} where {expected} was due")]
    OutOfOrder {
        /// The request id due.
        expected: u64,
        /// The request id found.
        found: u64,
    },
}

/// Outcome of a read or map request, as the owner reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Served; the payload (or the memfd) follows.
    Ok,
    /// The remote key does not match.
    BadRemoteKey,
    /// Outside the region.
    OutOfBounds,
    /// No such region.
    UnknownRegion,
    /// Longer than the limit.
    TooLarge,
    /// The region has no memfd to share.
    NotShareable,
    /// A code this build does not know.
    Other(u16),
}

impl Status {
    fn code(self) -> u16 {
        match self {
            Status::Ok => 0,
            Status::BadRemoteKey => 1,
            Status::OutOfBounds => 2,
            Status::UnknownRegion => 3,
            Status::TooLarge => 4,
            Status::NotShareable => 5,
            Status::Other(code) => code,
        }
    }

    fn from_code(code: u16) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::BadRemoteKey,
            2 => Status::OutOfBounds,
            3 => Status::UnknownRegion,
            4 => Status::TooLarge,
            5 => Status::NotShareable,
            other => Status::Other(other),
        }
    }
}

/// Ask the owner for `len` bytes at `offset` of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Matches the response to the request.
    pub request_id: u64,
    /// The region.
    pub region_id: u64,
    /// Offset in the region.
    pub offset: u64,
    /// The region's remote key.
    pub remote_key: u64,
    /// Bytes wanted.
    pub len: u32,
}

/// The owner's answer; on `Ok`, `len` payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadResponse {
    /// The request answered.
    pub request_id: u64,
    /// Outcome.
    pub status: Status,
    /// Payload bytes that follow (0 unless `status` is `Ok`).
    pub len: u32,
}

/// Ask the owner for a region's memfd (shared-memory transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRequest {
    /// The region.
    pub region_id: u64,
    /// The region's remote key.
    pub remote_key: u64,
}

/// The owner's answer; on `Ok` the memfd travels with it (SCM_RIGHTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapResponse {
    /// Outcome.
    pub status: Status,
    /// Length of the region.
    pub len: u64,
    /// Offset of the region in the memfd, a multiple of the page size.
    pub memfd_offset: u64,
}

/// What one side of an RDMA reliable-connected queue pair tells the other, over the tcp control
/// channel, to connect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number, 24 bits.
    pub qp_num: u32,
    /// Local identifier of the port (InfiniBand); 0 on RoCE.
    pub lid: u16,
    /// Global identifier (RoCE, or routed InfiniBand); all zero when unused.
    pub gid: [u8; 16],
    /// First packet sequence number, 24 bits.
    pub psn: u32,
    /// The port's active MTU as the verbs enumeration gives it (1 = 256 bytes ... 5 = 4096).
    pub mtu: u8,
}

/// The owner's answer to a [`MapRequest`] on the RDMA control channel: where the region lies in
/// the owner's address space and the key its RDMA device checks on every read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaGrant {
    /// Outcome; on a refusal every other field but `region_id` is zero.
    pub status: Status,
    /// The region asked for.
    pub region_id: u64,
    /// Address of the region's first byte in the owner's registration.
    pub addr: u64,
    /// Length of the region.
    pub len: u64,
    /// The RDMA remote key of the region's registration.
    pub rkey: u32,
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn seal(buf: &mut [u8]) {
    let end = buf.len() - 4;
    let crc = crc32fast::hash(&buf[..end]);
    put(buf, end, &crc.to_le_bytes());
}

/// Checks length, magic, version and CRC; returns the frame's fixed-size bytes.
fn open<const N: usize>(bytes: &[u8], magic: [u8; 4]) -> Result<&[u8; N], FrameError> {
    let frame: &[u8; N] =
        bytes
            .get(..N)
            .and_then(|b| b.try_into().ok())
            .ok_or(FrameError::Short {
                len: bytes.len(),
                needed: N,
            })?;
    let found = [frame[0], frame[1], frame[2], frame[3]];
    if found != magic {
        return Err(FrameError::BadMagic { found });
    }
    let version = u16::from_le_bytes([frame[4], frame[5]]);
    if version != WIRE_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let stored = u32::from_le_bytes([frame[N - 4], frame[N - 3], frame[N - 2], frame[N - 1]]);
    if stored != crc32fast::hash(&frame[..N - 4]) {
        return Err(FrameError::Checksum);
    }
    Ok(frame)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn header(magic: [u8; 4], second: u16) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&magic);
    h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&second.to_le_bytes());
    h
}

impl ReadRequest {
    /// The frame's bytes.
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let mut b = [0u8; REQUEST_BYTES];
        put(&mut b, 0, &header(REQUEST_MAGIC, KIND_READ));
        put(&mut b, 8, &self.request_id.to_le_bytes());
        put(&mut b, 16, &self.region_id.to_le_bytes());
        put(&mut b, 24, &self.offset.to_le_bytes());
        put(&mut b, 32, &self.remote_key.to_le_bytes());
        put(&mut b, 40, &self.len.to_le_bytes());
        seal(&mut b);
        b
    }

    /// Decodes a frame.
    ///
    /// # Errors
    ///
    /// The first check that failed.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b = open::<REQUEST_BYTES>(bytes, REQUEST_MAGIC)?;
        let kind = u16_at(b, 6);
        if kind != KIND_READ {
            return Err(FrameError::BadField {
                field: "kind",
                value: kind.into(),
            });
        }
        Ok(Self {
            request_id: u64_at(b, 8),
            region_id: u64_at(b, 16),
            offset: u64_at(b, 24),
            remote_key: u64_at(b, 32),
            len: u32_at(b, 40),
        })
    }
}

impl ReadResponse {
    /// The frame's bytes.
    pub fn encode(&self) -> [u8; RESPONSE_BYTES] {
        let mut b = [0u8; RESPONSE_BYTES];
        put(&mut b, 0, &header(RESPONSE_MAGIC, self.status.code()));
        put(&mut b, 8, &self.request_id.to_le_bytes());
        put(&mut b, 16, &self.len.to_le_bytes());
        seal(&mut b);
        b
    }

    /// Decodes a frame.
    ///
    /// # Errors
    ///
    /// The first check that failed; a payload length on a refusal is a `BadField`.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b = open::<RESPONSE_BYTES>(bytes, RESPONSE_MAGIC)?;
        let status = Status::from_code(u16_at(b, 6));
        let len = u32_at(b, 16);
        if status != Status::Ok && len != 0 {
            return Err(FrameError::BadField {
                field: "len",
                value: len.into(),
            });
        }
        if b[20..28].iter().any(|&x| x != 0) {
            return Err(FrameError::BadField {
                field: "reserved",
                value: 0,
            });
        }
        Ok(Self {
            request_id: u64_at(b, 8),
            status,
            len,
        })
    }
}

impl MapRequest {
    /// The frame's bytes.
    pub fn encode(&self) -> [u8; MAP_REQUEST_BYTES] {
        let mut b = [0u8; MAP_REQUEST_BYTES];
        put(&mut b, 0, &header(MAP_REQUEST_MAGIC, 0));
        put(&mut b, 8, &self.region_id.to_le_bytes());
        put(&mut b, 16, &self.remote_key.to_le_bytes());
        seal(&mut b);
        b
    }

    /// Decodes a frame.
    ///
    /// # Errors
    ///
    /// The first check that failed.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b = open::<MAP_REQUEST_BYTES>(bytes, MAP_REQUEST_MAGIC)?;
        if u16_at(b, 6) != 0 || b[24..28].iter().any(|&x| x != 0) {
            return Err(FrameError::BadField {
                field: "reserved",
                value: 0,
            });
        }
        Ok(Self {
            region_id: u64_at(b, 8),
            remote_key: u64_at(b, 16),
        })
    }
}

impl MapResponse {
    /// The frame's bytes.
    pub fn encode(&self) -> [u8; MAP_RESPONSE_BYTES] {
        let mut b = [0u8; MAP_RESPONSE_BYTES];
        put(&mut b, 0, &header(MAP_RESPONSE_MAGIC, self.status.code()));
        put(&mut b, 8, &self.len.to_le_bytes());
        put(&mut b, 16, &self.memfd_offset.to_le_bytes());
        seal(&mut b);
        b
    }

    /// Decodes a frame.
    ///
    /// # Errors
    ///
    /// The first check that failed.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b = open::<MAP_RESPONSE_BYTES>(bytes, MAP_RESPONSE_MAGIC)?;
        if b[24..28].iter().any(|&x| x != 0) {
            return Err(FrameError::BadField {
                field: "reserved",
                value: 0,
            });
        }
        Ok(Self {
            status: Status::from_code(u16_at(b, 6)),
            len: u64_at(b, 8),
            memfd_offset: u64_at(b, 16),
        })
    }
}

impl QpEndpoint {
    /// The frame's bytes.
    pub fn encode(&self) -> [u8; ENDPOINT_BYTES] {
        let mut b = [0u8; ENDPOINT_BYTES];
        put(&mut b, 0, &header(ENDPOINT_MAGIC, self.lid));
        put(&mut b, 8, &self.qp_num.to_le_bytes());
        put(&mut b, 12, &self.psn.to_le_bytes());
        put(&mut b, 16, &self.gid);
        b[32] = self.mtu;
        seal(&mut b);
        b
    }

    /// Decodes a frame.
    ///
    /// # Errors
    ///
    /// The first check that failed, including a queue pair number or PSN wider than 24 bits
    /// and an MTU code outside 1..=5.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b = open::<ENDPOINT_BYTES>(bytes, ENDPOINT_MAGIC)?;
        let (qp_num, psn, mtu) = (u32_at(b, 8), u32_at(b, 12), b[32]);
        for (field, value) in [("qp_num", qp_num), ("psn", psn)] {
            if value >= 1 << 24 {
                return Err(FrameError::BadField {
                    field,
                    value: value.into(),
                });
            }
        }
        if !(1..=5).contains(&mtu) {
            return Err(FrameError::BadField {
                field: "mtu",
                value: mtu.into(),
            });
        }
        if b[33..36].iter().any(|&x| x != 0) {
            return Err(FrameError::BadField {
                field: "reserved",
                value: 0,
            });
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        Ok(Self {
            qp_num,
            lid: u16_at(b, 6),
            gid,
            psn,
            mtu,
        })
    }
}

impl RdmaGrant {
    /// A refusal of `region_id` with `status`.
    pub fn refusal(region_id: u64, status: Status) -> Self {
        Self {
            status,
            region_id,
            addr: 0,
            len: 0,
            rkey: 0,
        }
    }

    /// The frame's bytes.
    pub fn encode(&self) -> [u8; GRANT_BYTES] {
        let mut b = [0u8; GRANT_BYTES];
        put(&mut b, 0, &header(GRANT_MAGIC, self.status.code()));
        put(&mut b, 8, &self.region_id.to_le_bytes());
        put(&mut b, 16, &self.addr.to_le_bytes());
        put(&mut b, 24, &self.len.to_le_bytes());
        put(&mut b, 32, &self.rkey.to_le_bytes());
        seal(&mut b);
        b
    }

    /// Decodes a frame.
    ///
    /// # Errors
    ///
    /// The first check that failed; a refusal that carries an address, length or key, and a
    /// grant whose end overflows the address space, are `BadField`s.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b = open::<GRANT_BYTES>(bytes, GRANT_MAGIC)?;
        let grant = Self {
            status: Status::from_code(u16_at(b, 6)),
            region_id: u64_at(b, 8),
            addr: u64_at(b, 16),
            len: u64_at(b, 24),
            rkey: u32_at(b, 32),
        };
        if grant.status != Status::Ok && (grant.addr != 0 || grant.len != 0 || grant.rkey != 0) {
            return Err(FrameError::BadField {
                field: "refusal",
                value: grant.len,
            });
        }
        if grant.addr.checked_add(grant.len).is_none() {
            return Err(FrameError::BadField {
                field: "len",
                value: grant.len,
            });
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn requests_round_trip(id in any::<u64>(), region in any::<u64>(), offset in any::<u64>(), key in any::<u64>(), len in any::<u32>()) {
            let r = ReadRequest { request_id: id, region_id: region, offset, remote_key: key, len };
            prop_assert_eq!(ReadRequest::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn responses_round_trip(id in any::<u64>(), code in 0u16..8, len in any::<u32>()) {
            let status = Status::from_code(code);
            let r = ReadResponse { request_id: id, status, len: if status == Status::Ok { len } else { 0 } };
            prop_assert_eq!(ReadResponse::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReadRequest::decode(&bytes);
            let _ = ReadResponse::decode(&bytes);
            let _ = MapRequest::decode(&bytes);
            let _ = MapResponse::decode(&bytes);
            let _ = QpEndpoint::decode(&bytes);
            let _ = RdmaGrant::decode(&bytes);
        }

        #[test]
        fn grants_round_trip(region in any::<u64>(), addr in 0u64..1 << 47, len in 0u64..1 << 40, rkey in any::<u32>()) {
            let g = RdmaGrant { status: Status::Ok, region_id: region, addr, len, rkey };
            prop_assert_eq!(RdmaGrant::decode(&g.encode()), Ok(g));
            let refusal = RdmaGrant::refusal(region, Status::BadRemoteKey);
            prop_assert_eq!(RdmaGrant::decode(&refusal.encode()), Ok(refusal));
        }
    }

    #[test]
    fn endpoints_round_trip_and_reject_damage() {
        let e = QpEndpoint {
            qp_num: 0x1234,
            lid: 7,
            gid: [0xfe; 16],
            psn: 0xabcdef,
            mtu: 5,
        };
        assert_eq!(QpEndpoint::decode(&e.encode()), Ok(e));
        for bit in 0..ENDPOINT_BYTES * 8 {
            let mut bad = e.encode();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(QpEndpoint::decode(&bad).is_err(), "bit {bit}");
        }
        for (bad, field) in [
            (QpEndpoint { psn: 1 << 24, ..e }, "psn"),
            (
                QpEndpoint {
                    qp_num: 1 << 24,
                    ..e
                },
                "qp_num",
            ),
            (QpEndpoint { mtu: 0, ..e }, "mtu"),
            (QpEndpoint { mtu: 6, ..e }, "mtu"),
        ] {
            assert!(matches!(
                QpEndpoint::decode(&bad.encode()),
                Err(FrameError::BadField { field: f, .. }) if f == field
            ));
        }
        assert!(matches!(
            QpEndpoint::decode(&[0; 10]),
            Err(FrameError::Short { .. })
        ));
    }

    #[test]
    fn a_refusing_grant_carries_no_key_and_a_grant_cannot_wrap() {
        let mut refusal = RdmaGrant::refusal(9, Status::UnknownRegion);
        refusal.rkey = 5;
        assert!(matches!(
            RdmaGrant::decode(&refusal.encode()),
            Err(FrameError::BadField {
                field: "refusal",
                ..
            })
        ));
        let wrapping = RdmaGrant {
            status: Status::Ok,
            region_id: 1,
            addr: u64::MAX - 10,
            len: 11,
            rkey: 1,
        };
        assert!(matches!(
            RdmaGrant::decode(&wrapping.encode()),
            Err(FrameError::BadField { field: "len", .. })
        ));
    }

    #[test]
    fn every_bit_flip_of_a_request_is_caught() {
        let frame = ReadRequest {
            request_id: 7,
            region_id: 1 << 32 | 3,
            offset: 4096,
            remote_key: 0xdead_beef,
            len: 65536,
        }
        .encode();
        for bit in 0..REQUEST_BYTES * 8 {
            let mut bad = frame;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(ReadRequest::decode(&bad).is_err(), "bit {bit}");
        }
        assert_eq!(
            ReadRequest::decode(&frame[..47]),
            Err(FrameError::Short {
                len: 47,
                needed: 48
            })
        );
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        // Found by the frame_decode fuzz target: padding was accepted and lost on re-encode.
        let mut b = MapRequest {
            region_id: 1,
            remote_key: 2,
        }
        .encode();
        b[25] = 1;
        seal(&mut b);
        assert!(matches!(
            MapRequest::decode(&b),
            Err(FrameError::BadField {
                field: "reserved",
                ..
            })
        ));
        let mut b = MapResponse {
            status: Status::Ok,
            len: 1,
            memfd_offset: 0,
        }
        .encode();
        b[27] = 1;
        seal(&mut b);
        assert!(matches!(
            MapResponse::decode(&b),
            Err(FrameError::BadField {
                field: "reserved",
                ..
            })
        ));
    }

    #[test]
    fn a_refusal_carrying_a_payload_is_malformed() {
        let mut b = ReadResponse {
            request_id: 1,
            status: Status::Ok,
            len: 5,
        }
        .encode();
        b[6..8].copy_from_slice(&1u16.to_le_bytes());
        seal(&mut b);
        assert!(matches!(
            ReadResponse::decode(&b),
            Err(FrameError::BadField { field: "len", .. })
        ));
    }
}
