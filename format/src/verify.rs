//! Verification: is a block that a tier or a peer returned the block a reader expects? The
//! one place that says so, for the engine's reads from every tier, the offline inspector and
//! the client's one-sided reads.
//!
//! What it checks, in order: the header ([`decode_header`]: magic, version, header CRC,
//! limits), then the identity the reader expects ([`Expected`]: generation, payload length,
//! and the payload's position and CRC where the reader knows them), then the key (its bytes
//! and its CRC), then zero padding up to the payload, and with the payload in hand its CRC.

use crate::{Error, HEADER_BYTES, Header, Result, decode, decode_header};

/// The block a reader expects: what its index, its map entry or a node's descriptor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    /// The key the block must carry.
    pub key: &'a [u8],
    /// Its generation.
    pub generation: u64,
    /// Bytes of its payload.
    pub payload_len: u32,
    /// Where its payload starts, when the reader knows (a map entry or a descriptor does).
    pub payload_offset: Option<u32>,
    /// The payload CRC its header records, when the reader knows (a map entry does).
    pub payload_crc32: Option<u32>,
}

impl Expected<'_> {
    /// The identity checks, on a header that decoded.
    fn check(&self, header: &Header) -> Result<()> {
        let mismatch = |field| {
            Err(Error::Mismatch {
                field,
                expected_generation: self.generation,
                found_generation: header.generation,
            })
        };
        if header.generation != self.generation {
            return mismatch("generation");
        }
        if header.payload_len != self.payload_len {
            return mismatch("payload length");
        }
        if self
            .payload_offset
            .is_some_and(|offset| offset != header.payload_offset)
        {
            return mismatch("payload position");
        }
        if self
            .payload_crc32
            .is_some_and(|crc| crc != header.payload_crc32)
        {
            return mismatch("payload checksum");
        }
        if usize::from(header.key_len) != self.key.len() {
            return mismatch("key");
        }
        Ok(())
    }
}

/// Verifies a block's head (its first `payload_offset` bytes: header, key, padding; bytes past
/// them are not looked at) against what the reader expects, and returns the header. The
/// payload is not here: check it with [`check_payload_crc32`] once it is.
///
/// # Errors
///
/// Those of [`decode_header`]; [`Error::Mismatch`] for a valid block that is not the one
/// expected; [`Error::Truncated`] if `head` ends before the payload's offset;
/// [`Error::KeyChecksum`], [`Error::NonZeroPadding`].
pub fn verify_head(head: &[u8], expected: &Expected<'_>) -> Result<Header> {
    let header = decode_header(head)?;
    expected.check(&header)?;
    let payload_offset = header.payload_offset as usize;
    let Some(head) = head.get(..payload_offset) else {
        return Err(Error::Truncated {
            needed_bytes: payload_offset as u64,
            available_bytes: head.len() as u64,
        });
    };
    // The header decoded, so the key ends before the payload starts.
    let key_end = HEADER_BYTES + usize::from(header.key_len);
    let key = &head[HEADER_BYTES..key_end];
    if key != expected.key {
        return Err(Error::Mismatch {
            field: "key",
            expected_generation: expected.generation,
            found_generation: header.generation,
        });
    }
    let key_crc = crc32fast::hash(key);
    if key_crc != header.key_crc32 {
        return Err(Error::KeyChecksum {
            expected: header.key_crc32,
            actual: key_crc,
        });
    }
    if let Some(at) = head[key_end..].iter().position(|&b| b != 0) {
        return Err(Error::NonZeroPadding {
            offset: key_end + at,
        });
    }
    Ok(header)
}

/// Verifies a whole block (every check of [`decode`], then the identity the reader expects)
/// and returns its payload. Bytes past the block are ignored.
///
/// # Errors
///
/// Those of [`decode`]; [`Error::Mismatch`] for a valid block that is not the one expected.
pub fn verify<'a>(bytes: &'a [u8], expected: &Expected<'_>) -> Result<&'a [u8]> {
    let block = decode(bytes)?;
    expected.check(&block.header)?;
    if block.key != expected.key {
        return Err(Error::Mismatch {
            field: "key",
            expected_generation: expected.generation,
            found_generation: block.header.generation,
        });
    }
    Ok(block.payload)
}

/// Checks a payload's CRC (`actual`, computed as it was read) against the one its header
/// records (`expected`).
///
/// # Errors
///
/// [`Error::PayloadChecksum`].
pub fn check_payload_crc32(actual: u32, expected: u32) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::PayloadChecksum { expected, actual })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_into, encoded_len};

    fn block(key: &[u8], payload: &[u8], generation: u64) -> Vec<u8> {
        let mut buf = vec![0u8; encoded_len(key.len(), payload.len(), 64)];
        encode_into(&mut buf, key, payload, generation, 64).expect("encode");
        buf
    }

    fn expected(key: &[u8], generation: u64, payload_len: u32) -> Expected<'_> {
        Expected {
            key,
            generation,
            payload_len,
            payload_offset: None,
            payload_crc32: None,
        }
    }

    #[test]
    fn the_block_expected_passes_head_and_whole() {
        let bytes = block(b"key", b"payload", 7);
        let header = verify_head(&bytes, &expected(b"key", 7, 7)).expect("head");
        let exact = Expected {
            payload_offset: Some(header.payload_offset),
            payload_crc32: Some(crc32fast::hash(b"payload")),
            ..expected(b"key", 7, 7)
        };
        assert_eq!(verify(&bytes, &exact), Ok(&b"payload"[..]));
        let head = &bytes[..header.payload_offset as usize];
        assert_eq!(verify_head(head, &exact), Ok(header));
        assert_eq!(
            check_payload_crc32(crc32fast::hash(b"payload"), header.payload_crc32),
            Ok(())
        );
    }

    #[test]
    fn another_block_is_a_mismatch_naming_what_differs() {
        let bytes = block(b"key", b"payload", 7);
        let field = |result: Result<Header>| match result {
            Err(Error::Mismatch { field, .. }) => field,
            other => panic!("expected a mismatch, got {other:?}"),
        };
        assert_eq!(
            field(verify_head(&bytes, &expected(b"key", 8, 7))),
            "generation"
        );
        assert_eq!(field(verify_head(&bytes, &expected(b"kez", 7, 7))), "key");
        assert_eq!(field(verify_head(&bytes, &expected(b"keys", 7, 7))), "key");
        assert_eq!(
            field(verify_head(&bytes, &expected(b"key", 7, 8))),
            "payload length"
        );
        let moved = Expected {
            payload_offset: Some(192),
            ..expected(b"key", 7, 7)
        };
        assert_eq!(field(verify_head(&bytes, &moved)), "payload position");
        let other_crc = Expected {
            payload_crc32: Some(1),
            ..expected(b"key", 7, 7)
        };
        assert_eq!(field(verify_head(&bytes, &other_crc)), "payload checksum");
        assert!(matches!(
            verify(&bytes, &expected(b"key", 9, 7)),
            Err(Error::Mismatch {
                field: "generation",
                expected_generation: 9,
                found_generation: 7
            })
        ));
    }

    #[test]
    fn damage_is_caught_where_it_is() {
        let bytes = block(b"key", b"payload", 7);
        let payload_offset = verify_head(&bytes, &expected(b"key", 7, 7))
            .expect("head")
            .payload_offset as usize;
        let mut padding = bytes.clone();
        padding[payload_offset - 1] = 1;
        assert!(matches!(
            verify_head(&padding, &expected(b"key", 7, 7)),
            Err(Error::NonZeroPadding { .. })
        ));
        let mut payload = bytes.clone();
        payload[payload_offset] ^= 1;
        assert!(verify_head(&payload, &expected(b"key", 7, 7)).is_ok());
        assert!(matches!(
            verify(&payload, &expected(b"key", 7, 7)),
            Err(Error::PayloadChecksum { .. })
        ));
        assert!(matches!(
            verify_head(&bytes[..payload_offset - 1], &expected(b"key", 7, 7)),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            check_payload_crc32(1, 2),
            Err(Error::PayloadChecksum {
                expected: 2,
                actual: 1
            })
        ));
    }
}
