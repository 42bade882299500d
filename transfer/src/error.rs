//! The one error type of this crate.

use std::io;

use crate::wire::{FrameError, Status};

/// What registering memory or reading it can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The owner refused the read: the remote key does not match the region's.
    #[error("remote key refused for region {region_id:#x}")]
    BadRemoteKey {
        /// The region asked for.
        region_id: u64,
    },
    /// The owner refused the read: it reaches outside the region.
    #[error("read of {len} bytes at offset {offset} is outside region {region_id:#x}")]
    OutOfBounds {
        /// The region asked for.
        region_id: u64,
        /// Offset of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
    },
    /// The region is not registered (never was, or was unregistered).
    #[error("region {region_id:#x} is not registered")]
    UnknownRegion {
        /// The region asked for.
        region_id: u64,
    },
    /// A single read longer than [`MAX_READ_BYTES`](crate::MAX_READ_BYTES).
    #[error("read of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes asked for.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The region cannot be shared with another process (it is not backed by a memfd).
    #[error("region {region_id:#x} is not backed by shareable memory")]
    NotShareable {
        /// The region asked for.
        region_id: u64,
    },
    /// The registry is full.
    #[error("no room for another region ({max} registered)")]
    TooManyRegions {
        /// The limit.
        max: usize,
    },
    /// The peer sent a frame that does not decode, or not the one expected.
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// The peer answered with a status this build does not know.
    #[error("peer answered with status {0:?}")]
    UnexpectedStatus(Status),
    /// No RDMA device is present (or the RDMA stack is not installed): use another transport.
    #[error("no RDMA device: {reason}")]
    NoRdmaDevice {
        /// What the verbs library said.
        reason: String,
    },
    /// A verbs call failed (RDMA transport).
    #[error("RDMA: cannot {action}: {source}")]
    Rdma {
        /// What was being attempted.
        action: &'static str,
        /// The error libibverbs reported.
        #[source]
        source: io::Error,
    },
    /// An RDMA READ completed with an error status; the connection it ran on is closed.
    #[error("RDMA read failed: {status} (vendor error {vendor_err:#x})")]
    RdmaCompletion {
        /// The completion status, as libibverbs words it.
        status: String,
        /// The device's own error code.
        vendor_err: u32,
    },
    /// A socket or mapping operation failed.
    #[error("cannot {action}: {source}")]
    Io {
        /// What was being attempted.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { action, source }
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
