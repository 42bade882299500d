//! Verification: a copy a tier returned is checked against the block the index expects before
//! a byte of it is served or copied to another tier. The checks themselves are the format
//! crate's ([`format::verify`], [`format::verify_head`]); this says what each tier's reader
//! expects.

use crate::Result;
use crate::format::{self, Expected};
use crate::meta::MapEntry;
use mooncake_kv_tiers::Tier;

use crate::slot::{HbmCopy, Slot};

/// What the index says of `slot`'s block; `payload_offset` where the copy records it.
fn expected(slot: &Slot, payload_offset: Option<u32>) -> Expected<'_> {
    Expected {
        key: &slot.key,
        generation: slot.generation,
        payload_len: slot.payload_len,
        payload_offset,
        payload_crc32: None,
    }
}

/// What the index and the map entry say of a block on NVMe.
fn expected_on_nvme<'a>(slot: &'a Slot, entry: &MapEntry) -> Expected<'a> {
    Expected {
        payload_offset: Some(entry.payload_offset),
        payload_crc32: Some(entry.payload_crc32),
        ..expected(slot, None)
    }
}

/// Checks a payload whose CRC came to `actual` against the `expected` one of its header.
pub(super) fn check_crc(actual: u32, expected: u32) -> Result<()> {
    Ok(format::check_payload_crc32(actual, expected)?)
}

/// Checks a payload against the CRC its header records.
pub(super) fn check_payload(payload: &[u8], expected: u32) -> Result<()> {
    check_crc(crc32fast::hash(payload), expected)
}

/// Checks the head of a block (its first `payload_offset` bytes: header, key, padding)
/// against its slot.
pub(super) fn check_head(slot: &Slot, head: &[u8], payload_offset: u32) -> Result<()> {
    format::verify_head(head, &expected(slot, Some(payload_offset)))?;
    Ok(())
}

/// Reads `copy`'s whole block out of HBM into host memory and verifies it against its slot,
/// every checksum included. Its payload is `block[copy.payload_offset..]`.
pub(super) fn read_hbm_verified(slot: &Slot, copy: &HbmCopy) -> Result<Vec<u8>> {
    let mut block = vec![0u8; copy.block_len as usize];
    copy.tier.read_at(copy.extent(), 0, &mut block)?;
    format::verify(&block, &expected(slot, Some(copy.payload_offset)))?;
    Ok(block)
}

/// Verifies a whole block read from NVMe against its slot and map entry and returns the
/// payload.
pub(super) fn verify_nvme<'a>(slot: &Slot, entry: &MapEntry, buf: &'a [u8]) -> Result<&'a [u8]> {
    Ok(format::verify(buf, &expected_on_nvme(slot, entry))?)
}

/// Verifies the head sectors of a block read from NVMe (header, key, padding).
pub(super) fn verify_nvme_head(slot: &Slot, entry: &MapEntry, head: &[u8]) -> Result<()> {
    format::verify_head(head, &expected_on_nvme(slot, entry))?;
    Ok(())
}

/// Checks a DRAM copy's head against its slot and returns the payload in place; its CRC is
/// checked only when `check_payload_crc` (the payload CRC was checked when it was written).
pub(super) fn verify_dram<'a>(
    slot: &Slot,
    bytes: &'a [u8],
    payload_offset: u32,
    check_payload_crc: bool,
) -> Result<&'a [u8]> {
    let header = format::verify_head(bytes, &expected(slot, Some(payload_offset)))?;
    // The head verified, so the payload lies within the extent the block was written into,
    // unless the extent is shorter than the header says.
    let payload = bytes
        .get(header.payload_offset as usize..header.block_len())
        .ok_or(format::Error::Truncated {
            needed_bytes: header.block_len() as u64,
            available_bytes: bytes.len() as u64,
        })?;
    if check_payload_crc {
        check_payload(payload, header.payload_crc32)?;
    }
    Ok(payload)
}
