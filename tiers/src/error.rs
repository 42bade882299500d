//! The one error type of this crate.

use std::io;

/// What a tier operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range; nothing was created.
    #[error("invalid tier configuration: {field}: {reason}")]
    Config {
        /// The offending field, named as in the config struct.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// No free extent is large enough. `free_bytes` may exceed `requested_bytes` when the free
    /// space is fragmented; `largest_free_bytes` says what would have fit.
    #[error(
        "tier out of space: requested {requested_bytes} bytes, {free_bytes} free, largest free extent {largest_free_bytes} bytes"
    )]
    OutOfSpace {
        /// Bytes asked for, after rounding up to the allocation unit.
        requested_bytes: u64,
        /// Free bytes in total.
        free_bytes: u64,
        /// The largest single free extent.
        largest_free_bytes: u64,
    },
    /// An access named bytes outside the extent it was given.
    #[error(
        "access out of bounds: offset {offset_bytes} + {len_bytes} bytes > extent of {extent_len_bytes} bytes"
    )]
    OutOfBounds {
        /// Offset of the access within the extent.
        offset_bytes: u64,
        /// Length of the access.
        len_bytes: u64,
        /// Length of the extent.
        extent_len_bytes: u64,
    },
    /// A direct transfer was asked for with an offset, length or buffer address that is not a
    /// multiple of the tier's unit; nothing was read or written.
    #[error("misaligned direct I/O: {what} is not a multiple of 4 KiB")]
    Misaligned {
        /// Which of offset, length or buffer address.
        what: &'static str,
    },
    /// A GPU (or the test device) refused: no driver, no device, out of device memory, a
    /// failed copy.
    #[error("{device}: cannot {action}: {reason}")]
    Device {
        /// Which device.
        device: String,
        /// What was being attempted, e.g. "allocate".
        action: &'static str,
        /// The driver's words.
        reason: String,
    },
    /// Creating or mapping the backing memory failed.
    #[error("cannot {action}: {source}")]
    Io {
        /// What was being attempted, e.g. "create memfd".
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
