//! The block format: one layout in DRAM, on NVMe and on the wire (`docs/format.md`).
//!
//! ```text
//! offset  size  field
//!      0     4  magic            b"MCKV"
//!      4     2  format_version   1
//!      6     2  header_len       64
//!      8     4  payload_len      bytes of payload
//!     12     4  payload_offset   where the payload starts, from byte 0 of the block
//!     16     8  generation       unique per put; bumped when a key is overwritten
//!     24     2  key_len          1..=MAX_KEY_BYTES
//!     26     2  flags            0 (no flags are defined in version 1)
//!     28     4  key_crc32        CRC32 (IEEE) of the key bytes
//!     32     4  payload_crc32    CRC32 (IEEE) of the payload bytes
//!     36    24  reserved         zero
//!     60     4  header_crc32     CRC32 (IEEE) of bytes 0..60
//!     64     k  key
//!   64+k     p  zero padding up to payload_offset
//! payload_offset  payload_len  payload
//! ```
//!
//! All integers are little-endian ([`le`], the codec every record of the project uses).
//! Decoding is total: every input yields a [`Block`] or an [`Error`], reads only inside the
//! input and allocates nothing. Whether a block is the one a reader expects (its key,
//! generation, payload position) is [`verify`] and [`verify_head`]: the one verification the
//! engine, the offline inspector and the client all use. The full description, with a version
//! table, is `docs/format.md` in the repository.

pub mod le;
mod verify;

pub use verify::{Expected, check_payload_crc32, verify, verify_head};

/// What encoding or decoding a block can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Keys must not be empty.
    #[error("empty key")]
    EmptyKey,
    /// A valid block, but not the one the reader expected ([`Expected`]): its slot was
    /// reused, or the descriptor or map entry that led to it is stale.
    #[error(
        "block mismatch: expected generation {expected_generation}, found {found_generation} ({field})"
    )]
    Mismatch {
        /// Which expectation the block did not meet.
        field: &'static str,
        /// The generation expected.
        expected_generation: u64,
        /// The generation found.
        found_generation: u64,
    },
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("key of {len_bytes} bytes is longer than the maximum of {max_bytes}")]
    KeyTooLong {
        /// Length of the key given.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("value of {len_bytes} bytes is larger than the maximum of {max_bytes}")]
    ValueTooLarge {
        /// Length of the value given.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The buffer to encode into is too small.
    #[error("buffer of {available_bytes} bytes is too small: {needed_bytes} needed")]
    BufferTooSmall {
        /// Bytes needed.
        needed_bytes: usize,
        /// Bytes available.
        available_bytes: usize,
    },
    /// Fewer bytes than the block needs: `needed_bytes` is what the header (or the fixed
    /// header size) asks for.
    #[error("truncated block: {needed_bytes} bytes needed, {available_bytes} available")]
    Truncated {
        /// Bytes the block needs.
        needed_bytes: u64,
        /// Bytes given.
        available_bytes: u64,
    },
    /// The first four bytes are not the block magic.
    #[error("not a block: magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A format version this build does not read.
    #[error("unsupported block format version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// A header field holds a value the format does not allow (a nonzero reserved field, a
    /// payload offset before the end of the key, a length over its limit).
    #[error("invalid block header: {field} = {value}")]
    BadHeaderField {
        /// The field, named as in `docs/format.md`.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The header's CRC does not match its bytes.
    #[error("header checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    HeaderChecksum {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The key's CRC does not match its bytes.
    #[error("key checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    KeyChecksum {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The payload's CRC does not match its bytes.
    #[error("payload checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    PayloadChecksum {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The padding between the key and the payload is not zero.
    #[error("nonzero padding byte at offset {offset}")]
    NonZeroPadding {
        /// Offset of the first nonzero byte from the start of the block.
        offset: usize,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether a chain's block is full, or partial and so the chain's last
/// (the engine's `put_chain_with` for its last block, `ChainPut::commit` for each; a
/// client's `put_chain`). It travels in the put frames of the control protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ChainEnd {
    /// A full block: a longer prompt with the same start goes through it, so the chain may
    /// grow past it.
    #[default]
    Full,
    /// Fewer tokens than a full block (a prompt rarely ends on a block boundary). A longer
    /// prompt's block at this place holds more tokens, so has another key: only the same
    /// prompt again can use this one. On the production conversation trace 0.8% of such
    /// blocks are used again, against 26% of full ones, and the engine's adaptive and
    /// prefix-aware eviction policies evict them first until one is hit.
    Partial,
}

/// The four bytes every block starts with.
pub const MAGIC: [u8; 4] = *b"MCKV";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 64;
/// Longest key. Keys are opaque bytes: content hashes (32 bytes for SHA-256) or the
/// structured strings some serving engines use (model, rank and hash, about 100 bytes).
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value: 64 MiB, eight times the largest KVCache block the design expects.
pub const MAX_VALUE_BYTES: usize = 64 << 20;
/// Largest payload alignment an encoder may ask for: 4 KiB, a page and an NVMe sector.
pub const MAX_PAYLOAD_ALIGN: usize = 4096;
/// Largest payload offset a valid header may carry: the header and the longest key, rounded up
/// to the largest alignment.
pub const MAX_PAYLOAD_OFFSET: usize =
    (HEADER_BYTES + MAX_KEY_BYTES).div_ceil(MAX_PAYLOAD_ALIGN) * MAX_PAYLOAD_ALIGN;

mod offset {
    pub(super) const MAGIC: usize = 0;
    pub(super) const VERSION: usize = 4;
    pub(super) const HEADER_LEN: usize = 6;
    pub(super) const PAYLOAD_LEN: usize = 8;
    pub(super) const PAYLOAD_OFFSET: usize = 12;
    pub(super) const GENERATION: usize = 16;
    pub(super) const KEY_LEN: usize = 24;
    pub(super) const FLAGS: usize = 26;
    pub(super) const KEY_CRC: usize = 28;
    pub(super) const PAYLOAD_CRC: usize = 32;
    pub(super) const RESERVED: usize = 36;
    pub(super) const HEADER_CRC: usize = 60;
}

// The layout is fixed: these hold at compile time or the build fails.
const _: () = assert!(offset::HEADER_CRC + 4 == HEADER_BYTES);
const _: () = assert!(offset::RESERVED + 24 == offset::HEADER_CRC);
const _: () = assert!(offset::PAYLOAD_CRC + 4 == offset::RESERVED);
const _: () = assert!(offset::GENERATION % 8 == 0);
const _: () = assert!(HEADER_BYTES.is_power_of_two());
const _: () = assert!(MAX_KEY_BYTES <= u16::MAX as usize);
const _: () = assert!(MAX_VALUE_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_PAYLOAD_OFFSET == 4096);

/// A decoded, checked block header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Length of the payload in bytes.
    pub payload_len: u32,
    /// Offset of the payload from the start of the block.
    pub payload_offset: u32,
    /// Generation of the block.
    pub generation: u64,
    /// Length of the key in bytes.
    pub key_len: u16,
    /// CRC32 of the key.
    pub key_crc32: u32,
    /// CRC32 of the payload.
    pub payload_crc32: u32,
}

impl Header {
    /// Bytes of the whole block: header, key, padding and payload.
    pub fn block_len(&self) -> usize {
        self.payload_offset as usize + self.payload_len as usize
    }
}

/// A block verified in place: header, key and payload all checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block<'a> {
    /// The header.
    pub header: Header,
    /// The key.
    pub key: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

/// Checks a key against the format's limits.
///
/// # Errors
///
/// [`Error::EmptyKey`] or [`Error::KeyTooLong`].
pub fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::KeyTooLong {
            len_bytes: key.len(),
            max_bytes: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

/// Checks a value against the format's limits.
///
/// # Errors
///
/// [`Error::ValueTooLarge`].
pub fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge {
            len_bytes: value.len(),
            max_bytes: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// Where the payload starts for a key of `key_len` bytes when payloads are aligned to
/// `payload_align` bytes (a power of two, at most [`MAX_PAYLOAD_ALIGN`]).
pub fn payload_offset(key_len: usize, payload_align: usize) -> usize {
    assert!(payload_align.is_power_of_two() && payload_align <= MAX_PAYLOAD_ALIGN);
    (HEADER_BYTES + key_len).next_multiple_of(payload_align)
}

/// Bytes a block of this key and payload length takes.
pub fn encoded_len(key_len: usize, payload_len: usize, payload_align: usize) -> usize {
    payload_offset(key_len, payload_align) + payload_len
}

/// Copies done in pieces of this size, CRC'd while the piece is still in cache.
const CHUNK_BYTES: usize = 64 << 10;

/// Encodes a block straight into `target` and returns its length. Bytes of `target` past the
/// block are left as they were.
///
/// The payload is copied and checksummed in one pass (piece by piece, while each piece is in
/// cache), so `target` is the only place the payload is ever written.
///
/// # Errors
///
/// [`Error::EmptyKey`], [`Error::KeyTooLong`], [`Error::ValueTooLarge`], or
/// [`Error::BufferTooSmall`] if `target` is shorter than [`encoded_len`].
///
/// # Panics
///
/// If `payload_align` is not a power of two of at most [`MAX_PAYLOAD_ALIGN`].
pub fn encode_into(
    target: &mut [u8],
    key: &[u8],
    payload: &[u8],
    generation: u64,
    payload_align: usize,
) -> Result<usize> {
    let payload_start = checked_layout(key, payload.len(), payload_align, target.len(), true)?;
    let block_len = payload_start + payload.len();
    let (head, rest) = target.split_at_mut(payload_start);
    let payload_target = &mut rest[..payload.len()];

    let mut payload_crc = crc32fast::Hasher::new();
    for (source, target) in payload
        .chunks(CHUNK_BYTES)
        .zip(payload_target.chunks_mut(CHUNK_BYTES))
    {
        target.copy_from_slice(source);
        payload_crc.update(target);
    }

    write_head(head, key, payload.len(), payload_crc.finalize(), generation);
    Ok(block_len)
}

/// Writes only the part of a block before its payload (header, key, padding) into `head`,
/// checksumming `payload` where it lies, for a block whose payload travels separately (to a
/// device, say). Returns the payload's offset, which is `head`'s length used.
///
/// # Errors
///
/// As [`encode_into`], with `head` in place of the whole block.
///
/// # Panics
///
/// If `payload_align` is not a power of two of at most [`MAX_PAYLOAD_ALIGN`].
pub fn encode_head(
    head: &mut [u8],
    key: &[u8],
    payload: &[u8],
    generation: u64,
    payload_align: usize,
) -> Result<usize> {
    let payload_start = checked_layout(key, payload.len(), payload_align, head.len(), false)?;
    write_head(
        &mut head[..payload_start],
        key,
        payload.len(),
        crc32fast::hash(payload),
        generation,
    );
    Ok(payload_start)
}

/// Seals a block whose payload is already in place: `block` holds the payload at
/// [`payload_offset`]`(key.len(), payload_align)`; this writes the header, key and padding
/// before it (checksumming the payload where it lies) and returns the block's length. For
/// payloads written by someone else (a peer, a device) into reserved space: no copy.
///
/// # Errors
///
/// As [`encode_into`], with `payload_len` in place of the payload.
///
/// # Panics
///
/// If `payload_align` is not a power of two of at most [`MAX_PAYLOAD_ALIGN`].
pub fn seal_in_place(
    block: &mut [u8],
    key: &[u8],
    payload_len: usize,
    generation: u64,
    payload_align: usize,
) -> Result<usize> {
    let payload_start = checked_layout(key, payload_len, payload_align, block.len(), true)?;
    let block_len = payload_start + payload_len;
    let (head, rest) = block.split_at_mut(payload_start);
    let payload_crc = crc32fast::hash(&rest[..payload_len]);
    write_head(head, key, payload_len, payload_crc, generation);
    Ok(block_len)
}

/// Checks a key and a payload length for a block, and that a buffer of `available` bytes can
/// hold the block (`whole`) or only the part before its payload; returns the payload offset.
fn checked_layout(
    key: &[u8],
    payload_len: usize,
    payload_align: usize,
    available: usize,
    whole: bool,
) -> Result<usize> {
    check_key(key)?;
    if payload_len > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge {
            len_bytes: payload_len,
            max_bytes: MAX_VALUE_BYTES,
        });
    }
    let payload_start = payload_offset(key.len(), payload_align);
    let needed = if whole {
        payload_start + payload_len
    } else {
        payload_start
    };
    if available < needed {
        return Err(Error::BufferTooSmall {
            needed_bytes: needed,
            available_bytes: available,
        });
    }
    Ok(payload_start)
}

/// Writes header, key and zero padding into `head` (everything before the payload). The
/// lengths were checked by the caller.
fn write_head(head: &mut [u8], key: &[u8], payload_len: usize, payload_crc: u32, generation: u64) {
    let payload_start = head.len();
    let (header, key_and_padding) = head.split_at_mut(HEADER_BYTES);
    let (key_target, padding) = key_and_padding.split_at_mut(key.len());
    key_target.copy_from_slice(key);
    padding.fill(0);

    header.fill(0);
    header[offset::MAGIC..][..4].copy_from_slice(&MAGIC);
    le::put_u16(header, offset::VERSION, FORMAT_VERSION);
    le::put_u16(header, offset::HEADER_LEN, HEADER_BYTES as u16);
    // Both fit: checked against MAX_VALUE_BYTES and MAX_PAYLOAD_OFFSET by the callers.
    le::put_u32(header, offset::PAYLOAD_LEN, payload_len as u32);
    le::put_u32(header, offset::PAYLOAD_OFFSET, payload_start as u32);
    le::put_u64(header, offset::GENERATION, generation);
    le::put_u16(header, offset::KEY_LEN, key.len() as u16);
    le::put_u32(header, offset::KEY_CRC, crc32fast::hash(key));
    le::put_u32(header, offset::PAYLOAD_CRC, payload_crc);
    let header_crc = crc32fast::hash(&header[..offset::HEADER_CRC]);
    le::put_u32(header, offset::HEADER_CRC, header_crc);
}

/// Decodes and checks the fixed header at the start of `bytes`: magic, version, header
/// length, header CRC, reserved fields and the limits of every length. Does not look past
/// the first [`HEADER_BYTES`] bytes, so it works on a header read alone.
///
/// # Errors
///
/// [`Error::Truncated`] if `bytes` is shorter than a header; otherwise the first check that
/// failed, with the value found.
pub fn decode_header(bytes: &[u8]) -> Result<Header> {
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        return Err(Error::Truncated {
            needed_bytes: HEADER_BYTES as u64,
            available_bytes: bytes.len() as u64,
        });
    };
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let version = le::u16_at(header, offset::VERSION);
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion { found: version });
    }
    let stored_crc = le::u32_at(header, offset::HEADER_CRC);
    let actual_crc = crc32fast::hash(&header[..offset::HEADER_CRC]);
    if stored_crc != actual_crc {
        return Err(Error::HeaderChecksum {
            expected: stored_crc,
            actual: actual_crc,
        });
    }
    // The CRC matched, so what follows is what an encoder wrote; the checks below catch
    // encoders (or versions) that wrote something this build does not accept.
    let bad = |field: &'static str, value: u64| Err(Error::BadHeaderField { field, value });
    let header_len = le::u16_at(header, offset::HEADER_LEN);
    if usize::from(header_len) != HEADER_BYTES {
        return bad("header_len", header_len.into());
    }
    let flags = le::u16_at(header, offset::FLAGS);
    if flags != 0 {
        return bad("flags", flags.into());
    }
    if header[offset::RESERVED..offset::HEADER_CRC]
        .iter()
        .any(|&b| b != 0)
    {
        return bad("reserved", 0);
    }
    let key_len = le::u16_at(header, offset::KEY_LEN);
    if key_len == 0 || usize::from(key_len) > MAX_KEY_BYTES {
        return bad("key_len", key_len.into());
    }
    let payload_len = le::u32_at(header, offset::PAYLOAD_LEN);
    if payload_len as usize > MAX_VALUE_BYTES {
        return bad("payload_len", payload_len.into());
    }
    let payload_offset = le::u32_at(header, offset::PAYLOAD_OFFSET);
    if (payload_offset as usize) < HEADER_BYTES + usize::from(key_len)
        || payload_offset as usize > MAX_PAYLOAD_OFFSET
    {
        return bad("payload_offset", payload_offset.into());
    }
    Ok(Header {
        payload_len,
        payload_offset,
        generation: le::u64_at(header, offset::GENERATION),
        key_len,
        key_crc32: le::u32_at(header, offset::KEY_CRC),
        payload_crc32: le::u32_at(header, offset::PAYLOAD_CRC),
    })
}

/// Decodes and fully verifies a block at the start of `bytes`: the header as in
/// [`decode_header`], then the key CRC, zero padding and the payload CRC. Bytes past the block
/// are ignored.
///
/// # Errors
///
/// [`Error::Truncated`] if `bytes` ends before the block does; otherwise the first check that
/// failed.
pub fn decode(bytes: &[u8]) -> Result<Block<'_>> {
    let header = decode_header(bytes)?;
    let Some(block) = bytes.get(..header.block_len()) else {
        return Err(Error::Truncated {
            needed_bytes: header.block_len() as u64,
            available_bytes: bytes.len() as u64,
        });
    };
    let key_end = HEADER_BYTES + usize::from(header.key_len);
    let key = &block[HEADER_BYTES..key_end];
    let key_crc = crc32fast::hash(key);
    if key_crc != header.key_crc32 {
        return Err(Error::KeyChecksum {
            expected: header.key_crc32,
            actual: key_crc,
        });
    }
    let padding = &block[key_end..header.payload_offset as usize];
    if let Some(at) = padding.iter().position(|&b| b != 0) {
        return Err(Error::NonZeroPadding {
            offset: key_end + at,
        });
    }
    let payload = &block[header.payload_offset as usize..];
    let payload_crc = crc32fast::hash(payload);
    if payload_crc != header.payload_crc32 {
        return Err(Error::PayloadChecksum {
            expected: header.payload_crc32,
            actual: payload_crc,
        });
    }
    Ok(Block {
        header,
        key,
        payload,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_head_encoded_apart_makes_the_same_block() {
        let key = b"some key";
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = vec![0u8; encoded_len(key.len(), payload.len(), 64)];
        encode_into(&mut whole, key, &payload, 42, 64).unwrap();
        let mut head = vec![0xffu8; payload_offset(key.len(), 64)];
        let at = encode_head(&mut head, key, &payload, 42, 64).unwrap();
        assert_eq!(at, head.len());
        assert_eq!(&whole[..at], &head[..]);
        let mut short = vec![0u8; at - 1];
        assert!(matches!(
            encode_head(&mut short, key, &payload, 42, 64),
            Err(Error::BufferTooSmall { .. })
        ));
    }

    use super::*;
    use proptest::prelude::*;

    fn encode(key: &[u8], payload: &[u8], generation: u64, align: usize) -> Vec<u8> {
        let mut buf = vec![0xee; encoded_len(key.len(), payload.len(), align)];
        let len = encode_into(&mut buf, key, payload, generation, align).unwrap();
        assert_eq!(len, buf.len());
        buf
    }

    #[test]
    fn layout_is_as_documented() {
        let block = encode(b"k", b"payload", 7, 64);
        assert_eq!(&block[..4], b"MCKV");
        assert_eq!(block[4..6], 1u16.to_le_bytes());
        assert_eq!(block[6..8], 64u16.to_le_bytes());
        assert_eq!(block[8..12], 7u32.to_le_bytes());
        assert_eq!(
            block[12..16],
            128u32.to_le_bytes(),
            "64 + 1 rounded up to 64"
        );
        assert_eq!(block[16..24], 7u64.to_le_bytes());
        assert_eq!(block[24..26], 1u16.to_le_bytes());
        assert_eq!(block[60..64], crc32fast::hash(&block[..60]).to_le_bytes());
        assert_eq!(block[64], b'k');
        assert!(block[65..128].iter().all(|&b| b == 0));
        assert_eq!(&block[128..], b"payload");
    }

    proptest! {
        #[test]
        fn sealing_in_place_gives_the_same_block_as_encoding(
            key in proptest::collection::vec(any::<u8>(), 1..100),
            payload in proptest::collection::vec(any::<u8>(), 0..5000),
            generation in any::<u64>(),
            align in prop_oneof![Just(64usize), Just(4096)],
        ) {
            let expected = encode(&key, &payload, generation, align);
            // Garbage where the header and key go, the payload already in place.
            let mut block = vec![0xa5; expected.len()];
            let start = payload_offset(key.len(), align);
            block[start..].copy_from_slice(&payload);
            let len = seal_in_place(&mut block, &key, payload.len(), generation, align).unwrap();
            prop_assert_eq!(len, expected.len());
            prop_assert_eq!(&block, &expected);
        }
    }

    #[test]
    fn limits_give_typed_errors() {
        let mut buf = vec![0; 4096];
        assert!(matches!(
            encode_into(&mut buf, b"", b"v", 1, 64),
            Err(Error::EmptyKey)
        ));
        let long_key = vec![1; MAX_KEY_BYTES + 1];
        assert!(matches!(
            encode_into(&mut buf, &long_key, b"v", 1, 64),
            Err(Error::KeyTooLong {
                len_bytes: 1025,
                max_bytes: 1024
            })
        ));
        assert!(matches!(
            encode_into(&mut buf, b"k", &[0; 5000], 1, 64),
            Err(Error::BufferTooSmall {
                needed_bytes: 5128,
                available_bytes: 4096
            })
        ));
        let huge = vec![0; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            encode_into(&mut buf, b"k", &huge, 1, 64),
            Err(Error::ValueTooLarge { .. })
        ));
        // The longest key at the largest alignment still fits the header's payload offset limit.
        let longest = vec![1; MAX_KEY_BYTES];
        let block = encode(&longest, b"v", 1, MAX_PAYLOAD_ALIGN);
        assert_eq!(decode(&block).unwrap().key, &longest[..]);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        for align in [64, 4096] {
            let block = encode(b"some/key/0042", &(0..=255).collect::<Vec<u8>>(), 42, align);
            for bit in 0..block.len() * 8 {
                let mut flipped = block.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode(&flipped).is_err(),
                    "flip of bit {bit} (align {align}) not detected"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let block = encode(b"key", &[7; 300], 1, 64);
        for len in 0..block.len() {
            assert!(
                matches!(decode(&block[..len]), Err(Error::Truncated { .. })),
                "truncation to {len} accepted"
            );
        }
    }

    #[test]
    fn oversized_fields_are_rejected_even_with_a_valid_crc() {
        let mut block = encode(b"key", b"value", 1, 64);
        let reseal = |b: &mut Vec<u8>| {
            let crc = crc32fast::hash(&b[..60]);
            b[60..64].copy_from_slice(&crc.to_le_bytes());
        };
        let cases: [(usize, &[u8], &str); 5] = [
            (8, &u32::MAX.to_le_bytes(), "payload_len"),
            (12, &u32::MAX.to_le_bytes(), "payload_offset"),
            (12, &10u32.to_le_bytes(), "payload_offset"),
            (24, &2000u16.to_le_bytes(), "key_len"),
            (26, &1u16.to_le_bytes(), "flags"),
        ];
        for (at, bytes, field) in cases {
            let mut bad = block.clone();
            bad[at..at + bytes.len()].copy_from_slice(bytes);
            reseal(&mut bad);
            match decode(&bad) {
                Err(Error::BadHeaderField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected BadHeaderField, got {other:?}"),
            }
        }
        // A payload length that is valid but longer than the input is a truncation.
        block[8..12].copy_from_slice(&1000u32.to_le_bytes());
        reseal(&mut block);
        assert!(matches!(
            decode(&block),
            Err(Error::Truncated {
                needed_bytes: 1128,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn round_trip(
            key in proptest::collection::vec(any::<u8>(), 1..=MAX_KEY_BYTES),
            payload in proptest::collection::vec(any::<u8>(), 0..200_000),
            generation in any::<u64>(),
            align_log2 in 0u32..=12,
            trailing in 0usize..100,
        ) {
            let align = 1usize << align_log2;
            let mut buf = encode(&key, &payload, generation, align);
            buf.extend(std::iter::repeat_n(0xab, trailing));
            let block = decode(&buf).unwrap();
            prop_assert_eq!(block.key, &key[..]);
            prop_assert_eq!(block.payload, &payload[..]);
            prop_assert_eq!(block.header.generation, generation);
            prop_assert_eq!(block.header.payload_offset as usize % align, 0);
            prop_assert_eq!(block.header.block_len(), buf.len() - trailing);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
