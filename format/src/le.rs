//! Fixed-width little-endian integers at fixed offsets: the one codec every on-media and
//! on-wire record of the project uses (block headers here, the engine's map entries, the
//! client's control frames).
//!
//! Each takes a record and a constant offset inside it; an offset past the end is a broken
//! invariant of the caller (its record has a fixed size), so these panic then rather than
//! return an error. Parse untrusted lengths first, into a record of the right size.

/// The `u16` at `at`.
///
/// # Panics
///
/// If `bytes` ends before `at + 2`.
pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(bytes, at))
}

/// The `u32` at `at`.
///
/// # Panics
///
/// If `bytes` ends before `at + 4`.
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(bytes, at))
}

/// The `u64` at `at`.
///
/// # Panics
///
/// If `bytes` ends before `at + 8`.
pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(bytes, at))
}

/// Writes `value` at `at`.
///
/// # Panics
///
/// If `buf` ends before `at + 2`.
pub fn put_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

/// Writes `value` at `at`.
///
/// # Panics
///
/// If `buf` ends before `at + 4`.
pub fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// Writes `value` at `at`.
///
/// # Panics
///
/// If `buf` ends before `at + 8`.
pub fn put_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_an_offset_and_is_little_endian() {
        let mut buf = [0u8; 15];
        put_u16(&mut buf, 1, 0x0102);
        put_u32(&mut buf, 3, 0x0304_0506);
        put_u64(&mut buf, 7, 0x0708_090a_0b0c_0d0e);
        assert_eq!(buf[1..3], [0x02, 0x01]);
        assert_eq!(buf[3..7], [0x06, 0x05, 0x04, 0x03]);
        assert_eq!(u16_at(&buf, 1), 0x0102);
        assert_eq!(u32_at(&buf, 3), 0x0304_0506);
        assert_eq!(u64_at(&buf, 7), 0x0708_090a_0b0c_0d0e);
    }

    #[test]
    #[should_panic(expected = "range end index")]
    fn an_offset_past_the_record_is_a_broken_invariant() {
        u32_at(&[0u8; 6], 4);
    }
}
