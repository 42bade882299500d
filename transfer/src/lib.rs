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
    run_in_lanes(ops.chunks_mut(per).collect(), run_on)
}

/// Runs `run(i, runs[i])` for every run at once, on a scoped thread each but the last, which
/// the calling thread takes, and returns their results in the order of the runs. A run whose
/// thread cannot start is left to the calling thread (one at a time, after its own); a panic
/// in a run is resumed here.
pub fn run_in_lanes<T, R, F>(mut runs: Vec<&mut [T]>, run: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(usize, &mut [T]) -> Vec<R> + Sync,
{
    let Some(last) = runs.pop() else {
        return Vec::new();
    };
    let last_index = runs.len();
    // Each run in a slot that its thread takes it from, or the calling thread if the thread
    // does not start.
    let slots: Vec<parking_lot::Mutex<Option<&mut [T]>>> = runs
        .into_iter()
        .map(|r| parking_lot::Mutex::new(Some(r)))
        .collect();
    let (run, slots) = (&run, &slots);
    let take = move |i: usize| {
        slots[i]
            .lock()
            .take()
            .map(|r| run(i, r))
            .unwrap_or_default()
    };
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..slots.len())
            .map(|i| {
                std::thread::Builder::new()
                    .name("mooncake-lane".into())
                    .spawn_scoped(scope, move || take(i))
                    .inspect_err(|error| tracing::debug!(%error, "cannot start a lane's thread"))
                    .ok()
            })
            .collect();
        let tail = run(last_index, last);
        let mut results = Vec::new();
        for (i, thread) in threads.into_iter().enumerate() {
            match thread.map(|t| t.join()) {
                Some(Ok(part)) => results.extend(part),
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => results.extend(take(i)),
            }
        }
        results.extend(tail);
        results
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

#[cfg(test)]
mod tests {
    use super::run_in_lanes;

    #[test]
    fn lanes_run_at_once_and_answer_in_order() {
        let mut items: Vec<u32> = (0..10).collect();
        let runs: Vec<&mut [u32]> = {
            let (a, rest) = items.split_at_mut(3);
            let (b, c) = rest.split_at_mut(1);
            vec![a, b, c]
        };
        // Every run sees its own index, and they all run at the same time: each waits at the
        // barrier until all three are there (a run left to the calling thread after another
        // would wait for ever).
        let barrier = std::sync::Barrier::new(3);
        let results = run_in_lanes(runs, |lane, run| {
            barrier.wait();
            run.iter_mut()
                .map(|x| {
                    *x += 100;
                    (lane, *x)
                })
                .collect()
        });
        let expected: Vec<(usize, u32)> = (0..10)
            .map(|x| {
                (
                    if x < 3 {
                        0
                    } else if x < 4 {
                        1
                    } else {
                        2
                    },
                    x + 100,
                )
            })
            .collect();
        assert_eq!(results, expected);
        assert_eq!(items, (100..110).collect::<Vec<_>>());
        assert!(run_in_lanes(Vec::<&mut [u32]>::new(), |_, _| vec![0u8]).is_empty());
    }

    #[test]
    #[should_panic(expected = "the first lane failed")]
    fn a_panic_on_a_lanes_thread_reaches_the_caller() {
        let mut items = [0u8; 4];
        let (a, b) = items.split_at_mut(2);
        // The first lane runs on a thread of its own; the last on the calling one.
        run_in_lanes(vec![a, b], |lane, _| -> Vec<()> {
            assert_ne!(lane, 0, "the first lane failed");
            Vec::new()
        });
    }
}
