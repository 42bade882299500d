//! Memory registration and one-sided reads between processes.
//!
//! A process registers memory in a [`Registry`] and gets a [`RegionHandle`]: region id,
//! length and a random remote key. A peer that has the handle reads bytes out of the region
//! through a [`Transport`] without the owner running any code but a check of the key and the
//! bounds of each read:
//!
//! - [`TcpTransport`] / [`TcpServer`]: works everywhere. The owner's listener writes the bytes
//!   from the region to the socket; the reader receives them straight into its buffer.
//!   Requests are pipelined over several connections.
//! - [`ShmTransport`] / [`ShmServer`]: same host. The owner hands the region's memfd over a
//!   Unix socket once; the reader maps it read-only, and a read is a `memcpy`.
//! - RDMA (feature `rdma`): see the `rdma` module.
//!
//! This crate moves opaque bytes. It knows nothing of blocks, keys or tiers; verifying that the
//! bytes read are the block that was wanted happens in the layer above, and must, because the
//! owner may rewrite a region while a peer reads it.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use mooncake_kv_transfer::{MemfdRegion, ReadOp, Registry, RemoteSlice, TcpServer, TcpTransport, Transport};
//!
//! let registry = Arc::new(Registry::new()?);
//! let region = Arc::new(MemfdRegion::new(1 << 20)?);
//! region.write(4096, b"hello, peer");
//! let handle = registry.register(region)?;
//! let server = TcpServer::bind("127.0.0.1:0", Arc::clone(&registry))?;
//!
//! let transport = TcpTransport::new(server.local_addr(), 2, Duration::from_secs(5))?;
//! let mut buf = [0u8; 11];
//! let src = RemoteSlice { region_id: handle.region_id, offset: 4096, remote_key: handle.remote_key };
//! transport.read(src, &mut buf)?;
//! assert_eq!(&buf, b"hello, peer");
//! # Ok::<(), mooncake_kv_transfer::Error>(())
//! ```
//!
//! # Limits
//!
//! [`MAX_READ_BYTES`] per read; [`MAX_REGIONS`] regions per registry.

mod conns;
mod error;
mod memory;
#[cfg(feature = "rdma")]
pub mod rdma;
mod registry;
mod shm;
mod tcp;
mod tcp_server;
pub mod wire;

use std::fmt;

pub use error::{Error, Result};
pub use memory::{MemfdRegion, MemorySource};
pub use registry::{MAX_REGIONS, RegionHandle, Registry};
pub use shm::{ShmServer, ShmTransport};
pub use tcp::{TcpServer, TcpTransport};

/// Longest single read: 128 MiB, sixteen times the largest KVCache block the design expects.
pub const MAX_READ_BYTES: u64 = 128 << 20;

/// Where to read from: a region of a peer, an offset in it, and the region's remote key. The
/// length is that of the destination buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteSlice {
    /// The region, from its [`RegionHandle`].
    pub region_id: u64,
    /// Offset in the region.
    pub offset: u64,
    /// The region's remote key, from its [`RegionHandle`].
    pub remote_key: u64,
}

/// One read of a batch: from `src` into all of `dst`.
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// Where to read from.
    pub src: RemoteSlice,
    /// Where the bytes go; its length is the read's.
    pub dst: &'a mut [u8],
}

/// Runs a batch over `lanes` connections, one thread per share, and gathers the results in
/// order; small batches run on the caller's thread.
pub(crate) fn spread_batch<'a, F>(
    ops: &mut [ReadOp<'a>],
    lanes: usize,
    small: usize,
    next: &std::sync::atomic::AtomicUsize,
    run_on: F,
) -> Vec<Result<()>>
where
    F: Fn(usize, &mut [ReadOp<'a>]) -> Vec<Result<()>> + Sync,
{
    if ops.len() <= small || lanes <= 1 {
        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % lanes.max(1);
        return run_on(index, ops);
    }
    let per = ops.len().div_ceil(lanes);
    let run_on = &run_on;
    std::thread::scope(|scope| {
        let handles: Vec<_> = ops
            .chunks_mut(per)
            .enumerate()
            .map(|(i, chunk)| scope.spawn(move || run_on(i, chunk)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a reader thread panicked"))
            .collect()
    })
}

/// One-sided access to memory another process registered.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Reads `dst.len()` bytes at `src` into `dst`.
    ///
    /// # Errors
    ///
    /// The owner's refusals ([`Error::BadRemoteKey`], [`Error::OutOfBounds`],
    /// [`Error::UnknownRegion`], [`Error::TooLarge`]) and transport failures. On an error the
    /// contents of `dst` are unspecified.
    fn read(&self, src: RemoteSlice, dst: &mut [u8]) -> Result<()>;

    /// Many reads with many in flight; one result per read, in order.
    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<()>>;

    /// [`read_batch`](Self::read_batch), and the CRC32 of each read's bytes as they landed in
    /// `dst`. A transport that copies the bytes itself checksums each piece right after
    /// copying it, while it is still in cache, which costs far less than a second pass.
    fn read_batch_crc32(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<u32>> {
        let results = self.read_batch(ops);
        results
            .into_iter()
            .zip(ops.iter())
            .map(|(result, op)| result.map(|()| crc32fast::hash(op.dst)))
            .collect()
    }

    /// Reads a block that its owner may free and reuse meanwhile, in one pass over its
    /// payload: `payload` at `payload_offset` bytes past `src`, then, after an acquire fence,
    /// `head` at `src`, which `check` must accept (`Ok(false)` when it does not).
    ///
    /// Sound when the owner leaves a block's payload alone while the block can be looked up,
    /// and overwrites its header before reusing any of its space (the engine's DRAM tier zeroes
    /// a freed block's header), and when `check` accepts only the header of the block the
    /// caller looked up (its generation is unique), in a lookup answered before this read:
    /// then the payload was copied after the block was published and before its header was
    /// overwritten. The default makes two reads.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    fn read_in_place(
        &self,
        src: RemoteSlice,
        head: &mut [u8],
        payload_offset: u64,
        payload: &mut [u8],
        check: &dyn Fn(&[u8]) -> bool,
    ) -> Result<bool> {
        let at = RemoteSlice {
            offset: src.offset.saturating_add(payload_offset),
            ..src
        };
        self.read(at, payload)?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        self.read(src, head)?;
        Ok(check(head))
    }
}

/// Nanoseconds on the system's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`): a few
/// milliseconds of resolution, read in a few nanoseconds where a precise clock read costs
/// tens. For the checks on a read's path that count in milliseconds (a descriptor's age, when
/// to look at a peer's socket again).
pub fn coarse_clock_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}
